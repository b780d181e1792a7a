#!/usr/bin/env bash
# Where does 2-GPU scaling go? (issue 5; BENCHMARKS.md: FSDP 2 + MP 2 ran at 55-75% per GPU of 1 GPU, with the
# memory layers' own collectives at 1-7% of the step.) One call on a 2-GPU machine, ~6 min:
#   1. dense_373m on 1 GPU and on 2 GPUs (FSDP alone, no memory layers): does plain FSDP scale here?
#   2. memory_373m on 2 GPUs with the values replicated (MP 1) against MP 2;
#   3. a compiled 2-GPU memory step under the profiler, one chrome trace per rank (gzipped) for a timeline.
#   bash scripts/gpu_scaling_probe.sh OUTDIR
set -u
OUT=${1:-/tmp/gpu_probe}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
common() {  # CONFIG -> overrides for a short, uncompiled, equal-global-batch run
  echo "config=$1 train.steps=25 train.log_every=5 train.val_every=0 train.val_batches=1 data.seq_len=2048
    model.max_seq_len=2048 train.batch_size=4 optim.warmup_steps=5 train.compile=false checkpoint.every=0
    checkpoint.save_final=false"
}
python -m train $(common configs/dense_373m.yaml) train.grad_accum=2 run_dir=$OUT/dense_gpu1 2>&1 | grep "^step 25/"
torchrun --standalone --nproc-per-node 2 -m train $(common configs/dense_373m.yaml) run_dir=$OUT/dense_gpu2 2>&1 | grep "^step 25/"
python -m train $(common configs/memory_373m.yaml) train.grad_accum=2 run_dir=$OUT/mem_gpu1 2>&1 | grep "^step 25/"
for mp in 1 2; do
  torchrun --standalone --nproc-per-node 2 -m train $(common configs/memory_373m.yaml) dist.memory_parallel=$mp \
    run_dir=$OUT/mem_gpu2_mp$mp 2>&1 | grep "^step 25/"
done
python scripts/compare_runs.py "$OUT"/dense_gpu1 "$OUT"/dense_gpu2 --skip 5
python scripts/compare_runs.py "$OUT"/mem_gpu1 "$OUT"/mem_gpu2_mp1 "$OUT"/mem_gpu2_mp2 --skip 5
torchrun --standalone --nproc-per-node 2 scripts/profile_step.py config=configs/memory_373m.yaml data.seq_len=2048 \
  model.max_seq_len=2048 train.batch_size=4 dist.memory_parallel=2 --warmup 4 --steps 2 --rows 15 \
  --trace "$OUT/trace" 2>&1 | grep -v Warning | tail -n 20
gzip -f "$OUT"/trace/*.json 2>/dev/null
rm -rf "$OUT"/dense_gpu* "$OUT"/mem_gpu*/checkpoints
