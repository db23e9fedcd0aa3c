#!/usr/bin/env bash
# GPU check of the training step (issues 7 and 21), on one H100 or H200, in stages ordered by value; each stage has
# its own time limit, a failing or timed-out stage does not stop the next ones, and the whole run stays within
# GPU_CHECK_BUDGET seconds (default 540, so that it fits a 10-minute call; a stage that would start with under 30 s
# left is skipped):
#   variants         full-size ADM, imagenet64 preset, bf16, batch 160, memory capped at 79 GiB (an 80 GB H100):
#                    today's eager step and each step variant side by side (scripts/gpu_check.py --variants: iteration
#                    time, images/s, peak memory, MFU with the eager FLOP count, compile time, JS vs reverse KL for the
#                    uncompiled ones, the first steps' losses against the eager ones), the 128 x 4 micro-batches
#   cifar10_r1       the cifar10 preset's DDPM++ with R1 (double backward) at its per-GPU batch 256, eager and layout
#   pytest_gpu       the gpu-marked equality tests of the speed settings (tests/test_speed.py)
#   js_rkl_compiled  JS vs reverse KL on the compiled step (compiles the reverse-KL graph too)
#   notebook         notebook 05's smoke path on the GPU (papermill, tiny preset, synthetic data)
# Figures go to stdout and GPU_CHECK_OUT (default build/gpu_check): one JSON per stage, the notebook's log and,
# merged with each stage's exit status and wall time, gpu_check_<date>_<device>.json (commit that one under
# docs/gpu/); the notebook's run folder goes to GPU_CHECK_WORK (default build/gpu_check_work).
#   bash scripts/gpu_check.sh [extra gpu_check.py flags for the imagenet64 stages, e.g. --teacher <edm pickle>]
# GPU_CHECK_STAGES: comma-separated stages to run (default all, in the order above). GPU_CHECK_DRY_RUN=1 runs the
# same stages on the CPU with the tiny network (--device cpu --tiny, aot_eager compilation; a test of this script).
# PYTHON picks the interpreter (default: the first of python3 and python that imports torch).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then  # the first of python3 and python that has torch (the CUDA image's python3 holds it)
  for c in python3 python; do
    if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then PY=$(command -v "$c"); break; fi
  done
fi
[[ -n "$PY" ]] || { echo "no python with torch found (set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${GPU_CHECK_OUT:-build/gpu_check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-540}
WORK=${GPU_CHECK_WORK:-build/gpu_check_work}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
STAGES=${GPU_CHECK_STAGES:-variants,cifar10_r1,pytest_gpu,js_rkl_compiled,notebook}
ALL_STAGES=" variants cifar10_r1 pytest_gpu js_rkl_compiled notebook "
for s in ${STAGES//,/ }; do
  [[ "$ALL_STAGES" == *" $s "* ]] || { echo "GPU_CHECK_STAGES: unknown stage '$s'; valid:$ALL_STAGES" >&2; exit 2; }
done
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
  DEV=(--device cpu --tiny --repeats 1 --variant-repeats 1 --micro-batch 2 --compile-backend aot_eager)
  IN64=(--batch 4); CIFAR=(--batch 4); DEVICE=cpu
else
  DEV=(--repeats 3); IN64=(--batch 160 --memory-gib 79); CIFAR=(--batch 256 --memory-gib 79)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo unknown)
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "device: $DEVICE; stages: $STAGES; budget $BUDGET s"
T0=$(date +%s)
status=0
declare -A RC WALL

# run_stage NAME LIMIT COMMAND...: runs COMMAND under min(LIMIT, budget left) seconds unless NAME is not selected
run_stage() {
  local name=$1 limit=$2; shift 2
  [[ ",$STAGES," == *",$name,"* ]] || return 0
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < 30 )); then
    echo "== $name: skipped, ${left} s of the ${BUDGET} s budget left"; RC[$name]=skipped; status=1; return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit $limit s)"
  rm -f "$OUT/$name.json"
  local start rc=0
  start=$(date +%s)
  timeout "$limit" "$@" || rc=$?
  WALL[$name]=$(( $(date +%s) - start )); RC[$name]=$rc
  (( rc == 124 )) && echo "   $name: TIMED OUT after $limit s"
  echo "== $name: ${WALL[$name]} s, exit $rc"
  (( rc == 0 )) || status=1
}

run_stage variants 330 "$PY" scripts/gpu_check.py "${DEV[@]}" "${IN64[@]}" --skip passes,js_vs_rkl,student_ab \
  --variants eager,layout,microbatch,compile_steps,compile_steps_graphs,channels_last,fused_adamw,fold_biases,compile_networks \
  --json "$OUT/variants.json" "$@"
run_stage cifar10_r1 70 "$PY" scripts/gpu_check.py "${DEV[@]}" --preset cifar10 "${CIFAR[@]}" \
  --skip passes,student_ab --variants eager,layout --json "$OUT/cifar10_r1.json"
run_stage pytest_gpu 90 "$PY" -m pytest -v -m gpu tests/test_speed.py -p no:cacheprovider --durations=0
run_stage js_rkl_compiled 100 "$PY" scripts/gpu_check.py "${DEV[@]}" "${IN64[@]}" \
  --skip passes,js_vs_rkl,mfu,student_ab --variants compile_steps --variant-js-rkl all \
  --json "$OUT/js_rkl_compiled.json" "$@"

nb_smoke() {
  rm -rf "$WORK/nb05_smoke"
  "$PY" -m papermill notebooks/05_imagenet.ipynb "$WORK/05_imagenet_gpu_smoke.ipynb" -p smoke True \
    -p output_dir "$WORK/nb05_smoke" --cwd notebooks -k python3 --no-progress-bar --log-output \
    > "$OUT/nb05_smoke.log" 2>&1 || { tail -40 "$OUT/nb05_smoke.log"; return 1; }
  "$PY" - "$WORK/nb05_smoke" <<'PY'
import json, sys
from pathlib import Path
rec = json.loads((Path(sys.argv[1]) / "results.json").read_text())
print("records:", json.dumps(rec))
print("device setting:", json.loads((Path(sys.argv[1]) / "run" / "config.json").read_text())["run"]["device"])
PY
}
export -f nb_smoke; export OUT WORK PY
run_stage notebook 45 bash -c nb_smoke

STAMP=$(date -u +%Y-%m-%d)
SLUG=$(echo "$DEVICE" | tr -cs 'A-Za-z0-9' '-' | sed 's/^-//; s/-$//')
MERGED="$OUT/gpu_check_${STAMP}_${SLUG}.json"
STAGE_STATUS=""
for s in ${STAGES//,/ }; do STAGE_STATUS+="$s=${RC[$s]:-}:${WALL[$s]:-0} "; done
"$PY" - "$MERGED" "$DEVICE" "$STAMP" "$OUT" $STAGE_STATUS <<'PY'
import json, sys
from pathlib import Path
merged, device, stamp, out, *stages = sys.argv[1:]
doc = {"device": device, "date": stamp, "stages": {}}
for item in stages:
    name, rest = item.split("=", 1)
    rc, wall = rest.rsplit(":", 1)
    entry = {"exit": int(rc) if rc.lstrip("-").isdigit() else rc or None, "wall_s": int(wall)}
    path = Path(out) / f"{name}.json"
    if path.is_file():
        entry["figures"] = json.loads(path.read_text())
    doc["stages"][name] = entry
Path(merged).write_text(json.dumps(doc, indent=2))
print(f"merged figures: {merged}")
PY
echo "total $(( $(date +%s) - T0 )) s of the $BUDGET s budget; exit $status"
exit "$status"
