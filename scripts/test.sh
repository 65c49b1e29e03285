#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ci_services.sh   # CI only: chromium + driver for tests/test_browser.py
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 \
       PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
# The house's layers (.importlinter) and lint first: a broken contract fails the suite before any test runs.
.venv/bin/lint-imports --no-cache --config .importlinter > /tmp/mcpl-lint-imports.log 2>&1 \
  || { cat /tmp/mcpl-lint-imports.log; echo "import-linter: a layer contract is broken (see above)" >&2; exit 1; }
.venv/bin/ruff check --quiet . || { echo "ruff: lint errors (see above)" >&2; exit 1; }
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure of the suite, not a pass.
exit $rc
