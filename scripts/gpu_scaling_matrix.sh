#!/usr/bin/env bash
# Per-GPU throughput of one training step (scripts/profile_step.py --no-profile: the trainer's own step on random
# tokens, no data loader) on 1 GPU and on 2 GPUs under several FSDP settings, at two per-GPU micro-batches.
# The 1-GPU runs accumulate 2 micro-batches, so every run takes the same global batch per optimizer step.
#   bash scripts/gpu_scaling_matrix.sh            env: CONFIG (memory_373m), BATCHES ("4 8"), STEPS (15),
#                                                      VARIANTS (2-GPU override sets, ';'-separated), MP (2),
#                                                      TORCHRUN_ARGS (e.g. "--numa-binding node")
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
CONFIG=${CONFIG:-configs/memory_373m.yaml}
MP=${MP:-2}
VARIANTS=${VARIANTS:-"dist.blocks_per_unit=1;dist.reshard_after_forward=false;dist.blocks_per_unit=4;dist.reshard_after_forward=false dist.blocks_per_unit=4"}
P="config=$CONFIG data.seq_len=2048 model.max_seq_len=2048 --warmup 5 --steps ${STEPS:-15} --no-profile"
rate() { grep -o '[0-9,]* tok/s per device' | tr -d ',' | cut -d' ' -f1; }
for b in ${BATCHES:-4 8}; do
  one=$(python scripts/profile_step.py $P train.batch_size=$b train.grad_accum=2 2>&1 | rate)
  echo "batch $b x 2048 | 1 GPU (accumulating 2) | $one tok/s | 1.000"
  IFS=';' read -ra sets <<< "$VARIANTS"
  for v in "${sets[@]}"; do
    two=$(torchrun --standalone --nproc-per-node 2 ${TORCHRUN_ARGS:-} scripts/profile_step.py $P train.batch_size=$b \
      dist.memory_parallel=$MP $v 2>&1 | rate)
    ratio=$(python -c "print(f'{${two:-0} / ${one:-1}:.3f}')")
    echo "batch $b x 2048 | 2 GPUs, MP $MP, $v ${TORCHRUN_ARGS:-}| ${two:-failed} tok/s per GPU | $ratio"
  done
done
