#!/usr/bin/env bash
# One prepared run for the few minutes of a lent GPU machine; writes benchmarks/results/gpu.json.
#
# The machine (an H200 here) has Python 3.12 with CUDA torch, transformers, accelerate, safetensors
# and peft, but no diffusers, no pydantic and no network. What mcpl's engine imports beyond that is
# carried as wheels in the git-ignored wheels/ folder (prepared on a connected machine, see below)
# and installed first with `pip install --no-index`, into a throwaway venv that sees the machine's
# own packages (--system-site-packages), or, where venv is missing, into a --target folder put
# first on PYTHONPATH.
#
# Then, in one process and within the time budget (each part starts only if it still fits; the
# JSON is rewritten after every part, so a kill keeps what was measured; skipped parts say why):
#   1. CUDA vs CPU: the tiny model trained on both (fp32, TF32 off): the same learned rows
#   2. SD 1.5's architecture (random weights) at 512 px bf16: bare / MCPL-one / full ms per step
#      and peak memory (benchmarks/step_overhead.py's measure, batch 4)
#   3. packed K = 1 / 4 / 8 full-MCPL jobs (batch 4 each) on it: ms per pack step, jobs per hour
#   4. SDXL's architecture at 1024 px: bare / one / full, without and with gradient checkpointing
#   5. 3 again with the UNet under torch.compile (set by the benchmark: RunOptions has no switch)
#
# usage:
#   bash benchmarks/gpu.sh                         # on the GPU machine (all of it: <= 6 min)
#   bash benchmarks/gpu.sh --device cpu --quick    # rehearsal here: tiny sizes, the same install step
# device tool: run(command="bash benchmarks/gpu.sh", carry=["wheels"], timeout_s=420)
#
# rehearsal with the install step for real: a "machine site" of links to this venv's packages minus
# what the machine lacks, so pip must install diffusers and pydantic from wheels/ (result of
# 2026-12-01: benchmarks/results/gpu_rehearsal_cpu.json, 105 s, every part but torch.compile ran):
#   S=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])"); mkdir /tmp/machine-site
#   for f in "$S"/*; do case $(basename "$f") in diffusers*|pydantic*|annotated_types*|typing_inspection*|\
#     *.pth|__editable__*|mcpl*) ;; *) ln -s "$f" /tmp/machine-site/;; esac; done
#   GPU_SH_SYSTEM_SITE=/tmp/machine-site PYTHON=.venv/bin/python bash benchmarks/gpu.sh --device cpu --quick \
#     --out benchmarks/results/gpu_rehearsal_cpu.json
#
# environment: PYTHON (default python3), GPU_SH_SECONDS (whole script, default 360),
#   GPU_SH_VENV (default /tmp/mcpl-gpuvenv), GPU_SH_SYSTEM_SITE (rehearsal only: a folder that plays
#   the machine's site-packages; the venv then does not see this interpreter's own site-packages),
#   GPU_SH_TARGET=1 (skip the venv, install with --target).
#
# wheels/ (Python 3.12, manylinux x86_64; cp311 pydantic_core too, for the rehearsal here):
#   pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
#     -d wheels/ diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 requests urllib3 idna certifi
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py --abi none \
#     --platform any -d wheels/ charset-normalizer typing-extensions
#   pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#     -d wheels/ pydantic-core==2.50.5
set -uo pipefail

START=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DEVICE=cuda
QUICK=""
RESULT=benchmarks/results/gpu.json
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=--quick; shift ;;
    --out) RESULT=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
TOTAL=${GPU_SH_SECONDS:-360}
PY=${PYTHON:-python3}
LOGDIR=$(mktemp -d /tmp/mcpl-gpu-sh.XXXXXX)
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL
mkdir -p "$(dirname "$RESULT")"
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu.sh $(elapsed) s] $*" >&2; }

fail() {  # a JSON that says what went wrong, so the run is never silent
  "$PY" - "$RESULT" "$1" "$LOGDIR" <<'EOF'
import json, pathlib, sys
out, reason, logs = sys.argv[1:4]
tails = {p.name: p.read_text(errors="replace")[-3000:] for p in sorted(pathlib.Path(logs).glob("*.log"))}
pathlib.Path(out).write_text(json.dumps({"error": reason, "logs": tails}, indent=1))
EOF
  say "failed: $1 (see $RESULT)"
  [ -n "${OUT:-}" ] && cp "$RESULT" "$LOGDIR"/*.log "$OUT"/ 2>/dev/null
  exit 1
}

# ------------------------------------------------------------------ 1. carried wheels
[ -d wheels ] || fail "no wheels/ folder: carry it (run(..., carry=[\"wheels\"]))"
# requirement -> module that proves it is there; installed only when missing (or too old)
CORE="diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5"
CORE="$CORE typing-extensions>=4.16"
missing_requests() {  # diffusers imports requests; install its stack only where the machine lacks it
  "$1" -c "import requests" 2>/dev/null && echo "" || echo "requests urllib3 idna charset-normalizer certifi"
}

RUNPY=""
if [ -z "${GPU_SH_TARGET:-}" ]; then
  VENV=${GPU_SH_VENV:-/tmp/mcpl-gpuvenv}
  rm -rf "$VENV"
  if [ -n "${GPU_SH_SYSTEM_SITE:-}" ]; then
    made=$("$PY" -m venv "$VENV" >"$LOGDIR/venv.log" 2>&1 && echo yes)
    SITE_DIR=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" 2>/dev/null)
    [ -n "$made" ] && echo "$GPU_SH_SYSTEM_SITE" > "$SITE_DIR/_machine_site.pth"
  else
    made=$("$PY" -m venv --system-site-packages "$VENV" >"$LOGDIR/venv.log" 2>&1 && echo yes)
  fi
  if [ -n "$made" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    EXTRA=$(missing_requests "$VENV/bin/python")
    say "installing carried wheels into the venv $VENV"
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --no-index --no-deps --find-links wheels $CORE $EXTRA \
      >"$LOGDIR/install.log" 2>&1 || fail "pip install --no-index into $VENV failed"
    RUNPY="$VENV/bin/python"
    export PYTHONPATH="$REPO"
    HOW="venv --system-site-packages${GPU_SH_SYSTEM_SITE:+ (rehearsal: machine site $GPU_SH_SYSTEM_SITE)}"
  else
    say "no usable venv here; installing with --target instead"
  fi
fi
if [ -z "$RUNPY" ]; then
  TARGET=/tmp/mcpl-gpu-site
  rm -rf "$TARGET"
  EXTRA=$(missing_requests "$PY")
  # shellcheck disable=SC2086
  "$PY" -m pip install --no-index --no-deps --find-links wheels --target "$TARGET" $CORE $EXTRA \
    >"$LOGDIR/install.log" 2>&1 || fail "pip install --no-index --target $TARGET failed"
  RUNPY="$PY"
  export PYTHONPATH="$TARGET:$REPO"
  HOW="pip --target $TARGET (first on PYTHONPATH)"
fi
say "installed ($HOW)"

# ------------------------------------------------------------------ 2. every import, once
"$RUNPY" - "$LOGDIR/imports.json" >"$LOGDIR/imports.log" 2>&1 <<'EOF' || fail "an import failed (imports.log)"
import importlib, json, sys, time
mods = ["torch", "numpy", "PIL", "safetensors", "transformers", "accelerate", "yaml", "tqdm", "requests",
        "typing_extensions", "pydantic", "pydantic_core", "diffusers", "mcpl.config", "mcpl.method.packing",
        "mcpl.method.families", "mcpl.method.tiny", "mcpl.job.run"]
out, bad = {}, []
for name in mods:
    t = time.time()
    try:
        m = importlib.import_module(name)
        out[name] = {"version": str(getattr(m, "__version__", "")), "from": str(getattr(m, "__file__", "")),
                     "s": round(time.time() - t, 2)}
    except Exception as err:
        out[name] = {"error": f"{type(err).__name__}: {err}"}
        bad.append(name)
import torch
out["cuda"] = {"available": torch.cuda.is_available(), "device": torch.cuda.get_device_name(0)
               if torch.cuda.is_available() else None, "torch_cuda": torch.version.cuda}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
sys.exit(1 if bad else 0)
EOF
say "imports ok"
if [ "$DEVICE" = cuda ] && ! "$RUNPY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  fail "no CUDA device visible"
fi

# ------------------------------------------------------------------ 3. the measurements
LEFT=$(( TOTAL - $(elapsed) - 10 ))
BUDGET=$(( LEFT - 25 ))  # the suite's own plan; the hard limit below leaves room to write the JSON
say "measuring on $DEVICE: ${BUDGET} s planned, hard limit ${LEFT} s"
timeout --signal=TERM --kill-after=5 "$LEFT" "$RUNPY" benchmarks/throughput.py --suite gpu --device "$DEVICE" \
  $QUICK --budget "$BUDGET" --out "$RESULT" >"$LOGDIR/suite.log" 2>&1
CODE=$?

# ------------------------------------------------------------------ 4. what happened, in the JSON
"$RUNPY" - "$RESULT" "$CODE" "$LOGDIR" "$HOW" "$(elapsed)" <<'EOF'
import json, pathlib, sys
out, code, logs, how, seconds = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3]), sys.argv[4], sys.argv[5]
path = pathlib.Path(out)
report = json.loads(path.read_text()) if path.exists() else {"error": "the suite wrote nothing"}
report["gpu_sh"] = {"exit_code": code, "killed_by_time_limit": code in (124, 137), "install": how,
                    "imports": json.loads((logs / "imports.json").read_text()), "total_s": int(seconds),
                    "installed": (logs / "install.log").read_text().strip().splitlines()[-1:]}
if code:
    report["gpu_sh"]["suite_log_tail"] = (logs / "suite.log").read_text(errors="replace")[-4000:]
path.write_text(json.dumps(report, indent=1))
EOF
[ -n "${OUT:-}" ] && cp "$RESULT" "$LOGDIR"/*.log "$OUT"/ 2>/dev/null
say "done (suite exit $CODE): $RESULT"
exit "$CODE"
