#!/usr/bin/env bash
# Where does 2-GPU scaling go: the memory layers' own collectives or the rest of the step? (BENCHMARKS.md:
# "the 2-GPU step was host-bound".) One call on a 2-GPU machine, a few minutes:
#   1. dense_373m on 1 GPU and on 2 GPUs (FSDP alone, no memory layers): does plain FSDP scale here?
#   2. memory_373m on 2 GPUs (MP 2) against 1 GPU;
#   3. a compiled memory step under the profiler on 1 GPU and on 2 GPUs: per-rank chrome traces (gzipped, in
#      OUTDIR/trace*) and scripts/trace_summary.py's account of where each GPU waited.
# Steps 1-2 are scripts/gpu_dist_check.sh's runs (same global batch per step on 1 and 2 GPUs); their run
# directories go to RUNS (default /tmp/gpu_probe_runs) so that OUTDIR holds only the traces.
#   bash scripts/gpu_scaling_probe.sh OUTDIR      env: SKIP_RUNS=1 (profiles only), CONFIG (profiled preset)
set -u
OUT=${1:-/tmp/gpu_probe}
RUNS=${RUNS:-/tmp/gpu_probe_runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 STEPS=25 NODES=0
if [ "${SKIP_RUNS:-0}" != 1 ]; then
  CONFIG=configs/dense_373m.yaml MP=1 bash scripts/gpu_dist_check.sh "$RUNS/dense" | tail -n 3
  CONFIG=configs/memory_373m.yaml MP=2 bash scripts/gpu_dist_check.sh "$RUNS/memory_mp2" | tail -n 3
fi
PROFILE="config=${CONFIG:-configs/memory_373m.yaml} data.seq_len=2048 model.max_seq_len=2048 train.batch_size=4
 --warmup 4 --steps 2 --rows 12"
python scripts/profile_step.py $PROFILE --trace "$OUT/trace1" 2>&1 | grep -v Warning | tail -n 40
torchrun --standalone --nproc-per-node 2 scripts/profile_step.py $PROFILE dist.memory_parallel=2 \
  --trace "$OUT/trace2" 2>&1 | grep -v Warning | tail -n 80
gzip -f "$OUT"/trace*/*.json 2>/dev/null
