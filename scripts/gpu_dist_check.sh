#!/usr/bin/env bash
# Issue 5 on a 2-GPU machine: the Memory+ 373M preset on 1 GPU, on 2 GPUs (FSDP + MP=2) and as two
# one-GPU "nodes" (torchrun --nnodes 2, c10d rendezvous on localhost). Same per-GPU batch; 50 steps each.
#   bash scripts/gpu_dist_check.sh OUTDIR
set -u
OUT=${1:-/tmp/gpu_dist}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
COMMON="config=configs/memory_373m.yaml train.steps=${STEPS:-50} train.log_every=10 train.val_every=0 train.val_batches=2
 data.seq_len=2048 model.max_seq_len=2048 train.batch_size=4 optim.warmup_steps=10 train.compile=${COMPILE:-false}
 checkpoint.every=0 checkpoint.save_final=false ${EXTRA:-}"
python -m train $COMMON run_dir=$OUT/gpu1 2>&1 | tail -n 8 | tee "$OUT/gpu1.log"
torchrun --standalone --nproc-per-node 2 -m train $COMMON dist.memory_parallel=2 run_dir=$OUT/gpu2_mp2 2>&1 \
  | grep -v Warning | tail -n 8 | tee "$OUT/gpu2_mp2.log"
for node in 0 1; do
  CUDA_VISIBLE_DEVICES=$node torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \
    --rdzv-endpoint localhost:29611 --rdzv-id twonodes -m train $COMMON dist.memory_parallel=2 \
    run_dir=$OUT/nodes2_mp2 > "$OUT/nodes2_node$node.log" 2>&1 &
done
wait
grep -v Warning "$OUT/nodes2_node0.log" | tail -n 8
python - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
def recs(name):
    path = os.path.join(out, name, "metrics.jsonl")
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []
base = None
print("\nrun            | loss@50 | val loss | tok/s/GPU (mean of steps > 10) | vs 1 GPU")
for name in ("gpu1", "gpu2_mp2", "nodes2_mp2"):
    r = recs(name)
    tr = [x for x in r if "tokens_per_s_per_device" in x and x["step"] > 10]
    if not tr:
        print(f"{name:14s} | no metrics"); continue
    tps = sum(x["tokens_per_s_per_device"] for x in tr) / len(tr)
    base = base or tps
    val = [x["val/loss"] for x in r if "val/loss" in x]
    print(f"{name:14s} | {tr[-1]['loss']:.4f} | {val[-1] if val else float('nan'):.4f} | {tps:,.0f} | {tps / base:.1%}")
PY
