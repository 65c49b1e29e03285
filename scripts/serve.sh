#!/usr/bin/env bash
# One command for the served pipeline: a Prefect server and an MLflow server on 127.0.0.1,
# the deployment mcpl/batch served from here, and (--workers N) N process workers for the
# per-job deployment mcpl-job/job. Ctrl-C stops everything it started.
#
#   bash scripts/serve.sh                 # then, in another shell:  prefect deployment run mcpl/batch --watch
#   bash scripts/serve.sh --workers 2     # + a work pool with two workers (use executor=workers)
#
# Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000). Stores and logs: SERVICES_DIR (runs/services/).
set -euo pipefail
cd "$(dirname "$0")/.."
workers=0
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
       TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
prefect_port="${PREFECT_PORT:-4200}"
mlflow_port="${MLFLOW_PORT:-5000}"
services="${SERVICES_DIR:-$PWD/runs/services}"
mkdir -p "$services/prefect" "$services/mlflow" "$services/logs"
export PREFECT_API_URL="http://127.0.0.1:$prefect_port/api"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$mlflow_port"

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 10); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 1
  done
  # Prefect's runner and workers want SIGINT after SIGTERM (ignored in a background job), then KILL.
  for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
  sleep 3
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

wait_http() {  # url name log
  for _ in $(seq 1 180); do
    if python -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  echo "$2 did not come up; see $3" >&2
  exit 1
}

PREFECT_HOME="$services/prefect" PREFECT_API_URL="" \
  prefect server start --host 127.0.0.1 --port "$prefect_port" > "$services/logs/prefect.log" 2>&1 &
pids+=($!)
mlflow server --backend-store-uri "sqlite:///$services/mlflow/mlflow.db" \
  --artifacts-destination "$services/mlflow/artifacts" --host 127.0.0.1 --port "$mlflow_port" \
  > "$services/logs/mlflow.log" 2>&1 &
pids+=($!)
wait_http "$PREFECT_API_URL/health" "Prefect server" "$services/logs/prefect.log"
wait_http "$MLFLOW_TRACKING_URI/health" "MLflow server" "$services/logs/mlflow.log"
# So that `prefect deployment run` in any shell talks to this server (undo: prefect config unset PREFECT_API_URL).
prefect config set PREFECT_API_URL="$PREFECT_API_URL" > /dev/null

[ -f data/example/rows.jsonl ] || mcpl data example data/example

if [ "$workers" -gt 0 ]; then
  python -m flows.serve --job-pool mcpl-gpu --register-only
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
  for i in $(seq 0 $((workers - 1))); do
    # One worker per GPU, each pinned to its own; on CPU they share the cores.
    if [ "$gpus" -gt 0 ]; then pin="$((i % gpus))"; else pin=""; fi
    CUDA_VISIBLE_DEVICES="$pin" MCPL_WORKER_NAME="worker-$i" \
      prefect worker start --pool mcpl-gpu --limit 1 --name "worker-$i" > "$services/logs/worker-$i.log" 2>&1 &
    pids+=($!)
  done
fi

cat <<EOF

  Prefect UI   http://127.0.0.1:$prefect_port        (flow runs, task runs, the batch summary artifact)
  MLflow UI    $MLFLOW_TRACKING_URI         (experiment "mcpl", Models = the concept registry)
  logs         $services/logs/

  In another shell:
    prefect deployment run mcpl/batch --watch
    prefect deployment run mcpl/batch --param steps=50 --param executor=workers --watch   (with --workers N)
    MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI .venv/bin/mcpl registry list

EOF
python -m flows.serve &
pids+=($!)
wait "${pids[-1]}"
