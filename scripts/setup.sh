#!/usr/bin/env bash
# Create .venv and install mcpl with its pinned stack (CPU torch 2.13.0). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q uv 2>&1 | grep -v "^WARNING: Location" || true
links=()
# A local CPU wheel of torch==2.13.0 (present on our build machines) avoids the multi-GB CUDA build.
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)
.venv/bin/python -m uv pip install -q --python .venv/bin/python ${links[@]+"${links[@]}"} -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import mcpl, torch, diffusers; print('mcpl ready: torch', torch.__version__, 'diffusers', diffusers.__version__)"
