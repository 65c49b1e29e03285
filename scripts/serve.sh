#!/usr/bin/env bash
# One command for the served pipeline: a Prefect server and an MLflow server on 127.0.0.1,
# the deployment mcpl/batch served from here, and (--workers N) N process workers for the
# per-job deployment mcpl-job/job. Ctrl-C stops everything it started.
#
#   bash scripts/serve.sh                 # then, in another shell in this folder:
#                                         #   prefect deployment run mcpl/batch --watch
#                                         #   mcpl registry list
#   bash scripts/serve.sh --workers 2     # + a work pool with two workers (use executor=workers)
#
# Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000). Stores and logs: SERVICES_DIR (PROJECT/runs/services).
# PROJECT is $MCPL_HOME, else this checkout: relative paths of a batch (out, dataset) start there.
# Nothing global is written: while it runs, PROJECT/prefect.toml points `prefect` commands run in
# PROJECT at this server, and PROJECT/.mcpl/tracking_uri points `mcpl registry` at this MLflow
# (both removed on exit); PROJECT/.mcpl/serve.env has the same for `source` from anywhere.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
workers=0
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -x "$repo/.venv/bin/python" ] || bash "$repo/scripts/setup.sh"
project="$(mkdir -p "${MCPL_HOME:-$repo}" && cd "${MCPL_HOME:-$repo}" && pwd)"
cd "$project"
export PATH="$repo/.venv/bin:$PATH"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
       TOKENIZERS_PARALLELISM=false MLFLOW_ENABLE_TELEMETRY=false PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# One line per event in the served logs: no artifact download bars, no "Waiting up to 300 seconds" notices.
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
prefect_port="${PREFECT_PORT:-4200}"
mlflow_port="${MLFLOW_PORT:-5000}"
services="${SERVICES_DIR:-$project/runs/services}"
mkdir -p "$services/prefect" "$services/prefect-client" "$services/mlflow" "$services/logs" "$project/.mcpl"
export PREFECT_API_URL="http://127.0.0.1:$prefect_port/api"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$mlflow_port"
# The processes started here keep Prefect's client state (profiles, local results) in the services
# folder, not in ~/.prefect.
export PREFECT_HOME="$services/prefect-client"

toml="$project/prefect.toml"
marker="# written by scripts/serve.sh"
uri_file="$project/.mcpl/tracking_uri"
env_file="$project/.mcpl/serve.env"
pids=()
cleanup() {
  trap - EXIT INT TERM
  # First stop pointing commands at servers that are going away.
  if [ -f "$uri_file" ] && [ "$(cat "$uri_file")" = "$MLFLOW_TRACKING_URI" ]; then rm -f "$uri_file"; fi
  if [ -f "$toml" ] && head -1 "$toml" | grep -qF "$marker" && grep -qF "$PREFECT_API_URL" "$toml"; then
    rm -f "$toml"
  fi
  if [ -f "$env_file" ] && grep -qF "$MLFLOW_TRACKING_URI" "$env_file"; then rm -f "$env_file"; fi
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
  for _ in $(seq 1 300); do
    if python -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  echo "$2 did not come up; see $3" >&2
  exit 1
}

# The UI's api_url follows the port (without PREFECT_SERVER_API_PORT it stays on :4200; spelled out, as
# PREFECT_API_URL is emptied for the server on the same line); logs are streamed out so that
# `prefect deployment run --watch` shows them as they come.
PREFECT_HOME="$services/prefect" PREFECT_API_URL="" PREFECT_SERVER_API_HOST=127.0.0.1 \
PREFECT_SERVER_API_PORT="$prefect_port" PREFECT_UI_API_URL="http://127.0.0.1:$prefect_port/api" \
PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true \
  prefect server start --host 127.0.0.1 --port "$prefect_port" > "$services/logs/prefect.log" 2>&1 &
pids+=($!)
mlflow server --backend-store-uri "sqlite:///$services/mlflow/mlflow.db" \
  --artifacts-destination "$services/mlflow/artifacts" --host 127.0.0.1 --port "$mlflow_port" \
  > "$services/logs/mlflow.log" 2>&1 &
pids+=($!)
wait_http "$PREFECT_API_URL/health" "Prefect server" "$services/logs/prefect.log"
wait_http "$MLFLOW_TRACKING_URI/health" "MLflow server" "$services/logs/mlflow.log"

# Project-local settings for commands run in another shell (Prefect reads ./prefect.toml; mcpl reads
# ./.mcpl/tracking_uri, mcpl.pipeline.tracking.store).
echo "$MLFLOW_TRACKING_URI" > "$uri_file"
printf 'export PREFECT_API_URL=%s MLFLOW_TRACKING_URI=%s\n' "$PREFECT_API_URL" "$MLFLOW_TRACKING_URI" > "$env_file"
prefect_hint="prefect deployment run mcpl/batch --watch"
if [ -f "$toml" ] && ! head -1 "$toml" | grep -qF "$marker"; then
  echo "note: $toml is yours, so it is left alone; in another shell run: source $env_file" >&2
  prefect_hint="source $env_file && $prefect_hint"
else
  printf '%s while it runs (removed on exit)\n[api]\nurl = "%s"\n' "$marker" "$PREFECT_API_URL" > "$toml"
fi

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

  In another shell, in $project (with $repo/.venv/bin on PATH: source .venv/bin/activate):
    $prefect_hint
    prefect deployment run mcpl/batch --param steps=50 --param executor=workers --watch   (with --workers N)
    mcpl registry list            (reads .mcpl/tracking_uri: this MLflow)

EOF
python -m flows.serve &
pids+=($!)
wait "${pids[-1]}"
