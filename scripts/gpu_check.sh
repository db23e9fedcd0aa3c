#!/usr/bin/env bash
# GPU check for issue 7 (one H100 or H200; about 3 minutes on an H200, timeouts stop it after 9): full-size
# ADM f-distill step time, images/s at the largest per-GPU batch, peak memory, share of each network pass,
# JS vs reverse-KL overhead, MFU, then the ImageNet-64 notebook's smoke path on the GPU. Figures go to
# stdout and build/gpu_check/ (JSON, notebook).
#   bash scripts/gpu_check.sh [extra gpu_check.py flags, e.g. --teacher downloads/edm/edm-imagenet-64x64-cond-adm.pkl]
# PYTHON picks the interpreter (default: python, else python3); GPU_CHECK_OUT the output folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${GPU_CHECK_OUT:-build/gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

echo "== f-distill training step, full-size ADM (scripts/gpu_check.py)"
start=$(date +%s)
timeout "${GPU_CHECK_STEP_TIMEOUT:-390}" "$PY" scripts/gpu_check.py --json "$OUT/gpu_check.json" "$@" || status=$?
echo "gpu_check.py: $(( $(date +%s) - start )) s, exit $status"

echo "== notebook 05 smoke path on the GPU (papermill, tiny preset, synthetic data)"
start=$(date +%s)
rm -rf "$OUT/nb05_smoke"
timeout "${GPU_CHECK_NB_TIMEOUT:-150}" "$PY" -m papermill notebooks/05_imagenet.ipynb "$OUT/05_imagenet_gpu_smoke.ipynb" \
  -p smoke True -p output_dir "$OUT/nb05_smoke" --cwd notebooks -k python3 --no-progress-bar --log-output \
  > "$OUT/nb05_smoke.log" 2>&1 || { tail -40 "$OUT/nb05_smoke.log"; exit 1; }
echo "notebook 05 smoke on GPU: $(( $(date +%s) - start )) s"
"$PY" - "$OUT/nb05_smoke" <<'PY'
import json, sys
from pathlib import Path
rec = json.loads((Path(sys.argv[1]) / "results.json").read_text())
print("records:", json.dumps(rec))
dev = json.loads((Path(sys.argv[1]) / "run" / "config.json").read_text())["run"]["device"]
print("device setting:", dev)
PY
grep -h "cuda\|process(es)" "$OUT/nb05_smoke.log" | head -5 || true
exit "$status"
