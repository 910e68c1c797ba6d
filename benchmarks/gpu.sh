#!/usr/bin/env bash
# One prepared GPU session for repsqueeze: GPU tests, a short GPU training run in
# fp32 and bf16-mixed, deploy.py on that GPU checkpoint in a CPU-only process, and the CUDA
# benchmarks. About 8 minutes on one H200; every stage has its own timeout, a failing stage
# does not stop the others, and everything lands in $OUT (8 files, flat):
#   summary.txt   environment, each stage's exit status and seconds
#   pytest.log    pytest -m gpu tests/training/test_gpu.py
#   train.log     train.py trainer=gpu (fp32, then bf16-mixed) and deploy.py on the checkpoint
#   bench.log     benchmarks/run.py --device cuda (progress, timings)
#   results_cuda.md, results_cuda.json, results_cuda_training.png, results_cuda_latency.png
#
# On the device machine (python3 with torch, lightning, timm, onnx, matplotlib, tabulate; no
# Hydra, so it travels in .device-site). From the repo root, once here:
#   bash /work/shared/device/pack-site.sh          # copies hydra/omegaconf into .device-site
# then the device tool's run, with carry [".device-site"] and timeout_s 600:
#   export PYTHONPATH=$PWD/.device-site:$PWD PYTHONUNBUFFERED=1; bash benchmarks/gpu.sh
# Back here, commit the measured results (never edit the numbers by hand):
#   cp <files_at>/results_cuda.{md,json} <files_at>/results_cuda_*.png benchmarks/
#   python benchmarks/run.py --plot-only           # redraw PNGs from the JSON files, if wanted
#   then link results_cuda.md from the GPU section of docs/benchmarks.md.
#
# Debug anywhere without a GPU (every stage runs, tiny sizes, on the CPU; stage timeouts x4):
#   GPU_SH_DEVICE=cpu GPU_SH_QUICK=1 GPU_SH_BUDGET=2400 OUT=/tmp/gpu-sh bash benchmarks/gpu.sh
# GPU_SH_BUDGET (seconds, default 540) bounds the whole script: the benchmark stage gets
# what the earlier stages left. GPU_SH_TIMEOUT_SCALE multiplies the other stages' timeouts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder that receives the logs and results}
DEVICE=${GPU_SH_DEVICE:-cuda}
QUICK=${GPU_SH_QUICK:-0}
BUDGET=${GPU_SH_BUDGET:-540}
PY=${PYTHON:-python3}
if [[ $DEVICE == cpu ]]; then SCALE=${GPU_SH_TIMEOUT_SCALE:-4}; else SCALE=${GPU_SH_TIMEOUT_SCALE:-1}; fi
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
WORK=$(mktemp -d)
START=$SECONDS
SUMMARY=$OUT/summary.txt

stage() {  # stage NAME TIMEOUT LOG COMMAND...: runs, appends to LOG, records status and time
    local name=$1 limit=$(($2 * SCALE)) log=$3
    shift 3
    local t0=$SECONDS
    echo "=== $name: $* (timeout ${limit}s)" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local verdict=ok
    [[ $rc -eq 124 || $rc -eq 137 ]] && verdict="TIMED OUT"
    [[ $rc -ne 0 && $verdict == ok ]] && verdict=FAILED
    printf '%-28s %-10s rc=%-4s %4ss\n' "$name" "$verdict" "$rc" $((SECONDS - t0)) | tee -a "$SUMMARY"
}

{
    echo "repsqueeze gpu.sh  $(date -u +%FT%TZ)  device=$DEVICE quick=$QUICK"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    $PY -c 'import torch, lightning; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "lightning", lightning.__version__)'
} >"$SUMMARY" 2>&1
cat "$SUMMARY"

# 1. GPU tests (collected and skipped without CUDA)
stage "pytest -m gpu" 170 "$OUT/pytest.log" \
    $PY -m pytest tests/training/test_gpu.py -m gpu -q -p no:cacheprovider --durations=10

# 2. short training runs on the GPU, fp32 and bf16-mixed; the deploy check must pass
if [[ $DEVICE == cuda ]]; then TRAINER=(trainer=gpu); else TRAINER=(trainer=cpu); fi
SHORT=("${TRAINER[@]}" trainer.max_epochs=1 trainer.limit_train_batches=8
    trainer.limit_val_batches=2 trainer.limit_test_batches=4 logger=none
    callbacks.progress_bar.refresh_rate=0 "paths.root_dir=$WORK")
stage "train.py fp32" 75 "$OUT/train.log" \
    $PY train.py "${SHORT[@]}" "hydra.run.dir=$WORK/fp32" "paths.output_dir=$WORK/fp32"
stage "train.py bf16-mixed" 75 "$OUT/train.log" \
    $PY train.py "${SHORT[@]}" trainer.precision=bf16-mixed "hydra.run.dir=$WORK/bf16" \
    "paths.output_dir=$WORK/bf16"

# 3. deploy.py on the GPU-trained checkpoint, in a process that sees no GPU
stage "deploy.py (CPU-only process)" 90 "$OUT/train.log" \
    env CUDA_VISIBLE_DEVICES= $PY deploy.py "ckpt_path=$WORK/fp32/checkpoints/last.ckpt" \
    "output_dir=$WORK/deployed" "hydra.run.dir=$WORK/deploy-run"
ls -l "$WORK/deployed" >>"$OUT/train.log" 2>&1

# 4. benchmarks: whatever time is left, at least 60 s
LEFT=$((BUDGET - (SECONDS - START)))
((LEFT < 60)) && LEFT=60
BENCH=(--device "$DEVICE" --out "$OUT/results_cuda")
if [[ $QUICK == 1 ]]; then BENCH+=(--quick); fi
if [[ $DEVICE == cpu ]]; then BENCH+=(--only latency,training --threads 1); fi
stage "benchmarks/run.py" "$((LEFT / SCALE))" "$OUT/bench.log" $PY benchmarks/run.py "${BENCH[@]}"

echo "total $((SECONDS - START))s" | tee -a "$SUMMARY"
rm -rf "$WORK"
ls "$OUT"
