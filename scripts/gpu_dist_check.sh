#!/usr/bin/env bash
# Distributed check on a 2-GPU machine: a Memory+ preset on 1 GPU, on 2 GPUs (FSDP + MP=2) and as two one-GPU "nodes"
# (torchrun --nnodes 2, c10d rendezvous on localhost). Every run takes the same global batch size per optimizer
# step (1 GPU: 2 micro-batches of accumulation; 2 GPUs: one each), so losses are comparable and tokens/s per
# GPU measures scaling at the same per-GPU micro-batch. Ranks own every world-size-th document, so the 2-GPU
# batches hold other rows than the single process's: compare mean losses, not single steps.
#   bash scripts/gpu_dist_check.sh OUTDIR
#   env: CONFIG, STEPS (50), BATCH (4), SEQ (2048), COMPILE, EXTRA, MP (memory-parallel degree, 2),
#        NODES (1: also the two-"node" run; 0: skip it)
set -u
OUT=${1:-/tmp/gpu_dist}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
SEQ=${SEQ:-2048}
MP=${MP:-2}
COMMON="config=${CONFIG:-configs/memory_373m.yaml} train.steps=${STEPS:-50} train.log_every=5 train.val_every=0
 train.val_batches=2 data.seq_len=$SEQ model.max_seq_len=$SEQ train.batch_size=${BATCH:-4} optim.warmup_steps=10
 train.compile=${COMPILE:-false} checkpoint.every=0 checkpoint.save_final=false ${EXTRA:-}"
python -m train $COMMON train.grad_accum=2 run_dir=$OUT/gpu1 2>&1 | grep -v Warning | tail -n 6 | tee "$OUT/gpu1.log"
torchrun --standalone --nproc-per-node 2 -m train $COMMON dist.memory_parallel=$MP run_dir=$OUT/gpu2_mp$MP 2>&1 \
  | grep -v Warning | tail -n 6 | tee "$OUT/gpu2_mp$MP.log"
RUNS=("$OUT/gpu1" "$OUT/gpu2_mp$MP")
if [ "${NODES:-1}" = 1 ]; then
  for node in 0 1; do
    CUDA_VISIBLE_DEVICES=$node torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \
      --rdzv-endpoint localhost:29611 --rdzv-id twonodes -m train $COMMON dist.memory_parallel=$MP \
      run_dir=$OUT/nodes2_mp$MP > "$OUT/nodes2_node$node.log" 2>&1 &
  done
  wait
  grep -v Warning "$OUT/nodes2_node0.log" | tail -n 6
  RUNS+=("$OUT/nodes2_mp$MP")
fi
python scripts/compare_runs.py "${RUNS[@]}"
