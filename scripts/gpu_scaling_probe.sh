#!/usr/bin/env bash
# Where does 2-GPU scaling go? (issue 5; BENCHMARKS.md: FSDP 2 + MP 2 ran at 55-75% per GPU of 1 GPU, with the
# memory layers' own collectives at 1-7% of the step.) One call on a 2-GPU machine, ~7 min:
#   1. dense_373m on 1 GPU and on 2 GPUs (FSDP alone, no memory layers): does plain FSDP scale here?
#   2. memory_373m on 2 GPUs with the values replicated (MP 1) and split (MP 2), each against 1 GPU;
#   3. a compiled 2-GPU memory step under the profiler, one chrome trace per rank (gzipped) for a timeline.
# The runs are scripts/gpu_dist_check.sh's (same global batch per step on 1 and 2 GPUs).
#   bash scripts/gpu_scaling_probe.sh OUTDIR
set -u
OUT=${1:-/tmp/gpu_probe}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 STEPS=25 NODES=0
CONFIG=configs/dense_373m.yaml MP=1 bash scripts/gpu_dist_check.sh "$OUT/dense" | tail -n 3
for mp in 1 2; do
  CONFIG=configs/memory_373m.yaml MP=$mp bash scripts/gpu_dist_check.sh "$OUT/memory_mp$mp" | tail -n 3
done
torchrun --standalone --nproc-per-node 2 scripts/profile_step.py config=configs/memory_373m.yaml data.seq_len=2048 \
  model.max_seq_len=2048 train.batch_size=4 dist.memory_parallel=2 --warmup 4 --steps 2 --rows 15 \
  --trace "$OUT/trace" 2>&1 | grep -v Warning | tail -n 20
gzip -f "$OUT"/trace/*.json 2>/dev/null
