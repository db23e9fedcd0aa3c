#!/usr/bin/env bash
# GPU check for issue 20 (one H100 or H200; not run yet): the text-to-image trainer on a full-size random SD1.5
# U-Net in bf16 at 64x64 latents (largest batch in 80 GB, step and iteration times, images/s, peak memory, MFU, the
# 8-GPU estimate for the paper's 60k iterations), then notebook 06's smoke path on the GPU. Figures go to stdout
# and build/t2i_gpu_check/.
#   bash scripts/t2i_gpu_check.sh [extra t2i_gpu_check.py flags, e.g. --gradient-checkpointing]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${GPU_CHECK_OUT:-build/t2i_gpu_check}
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "== text-to-image f-distill step, full-size SD1.5 U-Net (scripts/t2i_gpu_check.py, memory capped at 79 GiB)"
start=$(date +%s)
timeout "${GPU_CHECK_STEP_TIMEOUT:-420}" "$PY" scripts/t2i_gpu_check.py --memory-gib 79 --json "$OUT/t2i_gpu_check.json" \
  "$@" || status=$?
echo "t2i_gpu_check.py: $(( $(date +%s) - start )) s, exit $status"
echo "== notebook 06 smoke path on the GPU"
start=$(date +%s)
timeout "${GPU_CHECK_NB_TIMEOUT:-150}" "$PY" -m papermill notebooks/06_text_to_image.ipynb "$OUT/06_gpu_smoke.ipynb" \
  -p smoke True -p output_dir "$OUT/nb06_smoke" --cwd notebooks -k python3 --no-progress-bar > "$OUT/nb06.log" 2>&1 \
  || { tail -40 "$OUT/nb06.log"; exit 1; }
echo "notebook 06 smoke on GPU: $(( $(date +%s) - start )) s"
exit "$status"
