#!/usr/bin/env bash
# The facts experiment's final configuration, one command on one GPU (RESULTS.md): the dense vs Memory+ pair at
# matched FLOPs plus two memory points for the size/placement plot (configs/sweeps/facts_gpu2.yaml), and at the
# same time a knowledge update (a small pretrained memory model taught 20 new people: memory-only against full
# finetuning). Everything ends within about TOTAL_S + 15 seconds.
#   bash scripts/facts_final.sh OUT [key=value ...]
# key=value: extra overrides for every run (e.g. train.device=cpu train.steps=4 ... for a dry run);
# env: PYTHON (python3), WORK (/tmp/facts_final), TOTAL_S (240), ENTITIES_SCALE (1), KU_ENTITIES (2000),
# KU_STEPS (200: finetuning steps).
set -u
out=${1:?usage: bash scripts/facts_final.sh OUT [key=value ...]}
shift
py=${PYTHON:-python3}
work=${WORK:-/tmp/facts_final}
total=${TOTAL_S:-240}
mkdir -p "$out"
timeout -k 5 $((total + 10)) $py scripts/knowledge_update.py --out "$out/ku" --entities "${KU_ENTITIES:-2000}" \
    --new-entities 20 --steps "${KU_STEPS:-200}" --lr 3e-3 --modes memory,all --replay-share 0.5 \
    train.device=cuda model.dim=128 model.n_layers=4 "model.memory.layers=[2]" model.memory.n_keys=256 \
    model.memory.knn=32 model.memory.k_dim=64 train.steps=600 train.batch_size=128 optim.warmup_steps=50 \
    eval.max_examples=500 eval.batch_size=250 data.num_workers=2 train.log_every=100 train.val_every=0 \
    "$@" > "$out/knowledge_update.log" 2>&1 &
ku=$!
$py scripts/facts_sweep.py --sweep configs/sweeps/facts_gpu2.yaml --out "$out/facts" --work "$work" --parallel 4 \
    --total-s "$total" --stop-grace-s 15 --entities-scale "${ENTITIES_SCALE:-1}" "$@"
wait $ku
echo "knowledge update: exit $? (124: stopped at the time limit; its log: $out/knowledge_update.log)"
cat "$out/ku/results.md" 2>/dev/null || tail -n 20 "$out/knowledge_update.log"
