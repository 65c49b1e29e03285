#!/usr/bin/env bash
# The main job on the embedded defaults: set up, then `dvc repro` the whole pipeline
# (example toy-world data -> validate -> train every job -> MLflow concept registry in
# ./mlflow.db -> metrics). No server needed. ~7 minutes from a fresh clone on a busy 2-core CPU
# (setup included); afterwards git status is clean (dvc.lock reproduced).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false
dvc repro
echo
echo "== metrics (dvc metrics show) =="
dvc metrics show
echo
echo "== concept registry (mcpl registry list) =="
mcpl registry list || true
cat <<'MSG'

Where to look:
  outputs/batch/jobs/<job>/attention/image_0.png   each learned word's attention on its image
  outputs/batch/jobs/<job>/samples/all.png         generations with the learned words
  outputs/eval/metrics.json                        attention IoU / disentanglement per concept
  mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1   then open http://127.0.0.1:5000
MSG
