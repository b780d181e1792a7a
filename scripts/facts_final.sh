#!/usr/bin/env bash
# The facts experiment's final configuration, one command on one GPU (RESULTS.md, F):
# 1. configs/sweeps/facts_final.yaml, 14 runs at once: the Memory+ / FLOPs-matched dense pair with 3 seeds each,
#    and exact match against memory size (128^2..512^2 values) in place of the layer-2 FFN, of the layer-1 FFN,
#    and beside the layer-2 FFN;
# 2. as soon as the pair's seed-0 memory run has finished (its final checkpoint), a knowledge update from it:
#    50 new people taught by finetuning only the memory, only its values, only the FFNs, or everything, 4 runs at
#    once (scripts/knowledge_update.py; 300 steps at lr 3e-3 with half the tokens replayed from pretraining).
# OUT gets 7 files, at its top level (the device tool brings back only a few, shallow ones): results.md and
# results.jsonl (the sweep), em_vs_memory_size.png, loss_vs_flops.png, ku_results.md and ku_results.jsonl (the
# knowledge update), log.txt (the sweep's output and the end of the update's). Data, runs and full logs stay in
# WORK. Everything ends within about TOTAL_S seconds.
#   bash scripts/facts_final.sh OUT [key=value ...]
# key=value: extra overrides for every run (e.g. train.device=cpu train.steps=4 ... for a dry run);
# env: PYTHON (python3), WORK (/tmp/facts_final), TOTAL_S (350: the whole command), SWEEP_S (270: the sweep),
# ENTITIES_SCALE (1), KU_STEPS (300), KU_LR (3e-3), KU_MODES (memory,values,ffn,all), KU_NEW (50: new people),
# KU_REPLAY (0.5: share of the finetuning tokens from the pretraining mixture).
set -u
out=${1:?usage: bash scripts/facts_final.sh OUT [key=value ...]}
shift
py=${PYTHON:-python3}
work=${WORK:-/tmp/facts_final}
total=${TOTAL_S:-350}
scale=${ENTITIES_SCALE:-1}
start=$(date +%s)
mkdir -p "$out" "$work"
rm -rf "$work/runs" "$work/ku"  # a rerun into the same WORK must not reuse an old base or old metrics

$py scripts/facts_sweep.py --sweep configs/sweeps/facts_final.yaml --out "$out" --work "$work" --parallel 14 \
    --total-s "${SWEEP_S:-270}" --stop-grace-s 15 --entities-scale "$scale" --no-run-files "$@" 2>&1 \
    | tee "$out/log.txt" &
sweep=$!

# The base of the knowledge update: the sweep's seed-0 Memory+ run, from its final checkpoint (or, if the sweep
# stopped it at its budget, the checkpoint it saved when stopped); its people are the update's "old" people.
base="$work/runs/mem_s0"
until [ -e "$base/summary.json" ] || ! kill -0 "$sweep" 2>/dev/null; do sleep 2; done
left=$((total - ($(date +%s) - start) - 10))
if compgen -G "$base/checkpoints/step_*" > /dev/null && [ "$left" -gt 0 ]; then
    echo "knowledge update from $base ($left s left)"
    timeout -k 5 "$left" $py scripts/knowledge_update.py --out "$work/ku" --base "$base" \
        --config configs/facts_gpu.yaml --old-data "$work/data/p5k" --new-entities "${KU_NEW:-50}" \
        --steps "${KU_STEPS:-300}" --lr "${KU_LR:-3e-3}" --modes "${KU_MODES:-memory,values,ffn,all}" \
        --replay-share "${KU_REPLAY:-0.5}" --parallel 4 --threads 2 "$@" > "$work/knowledge_update.log" 2>&1
    echo "knowledge update: exit $? (124: stopped at the time limit)"
else
    echo "knowledge update skipped: no checkpoint of the base run in $base/checkpoints"
fi
wait "$sweep"
for f in results.md results.jsonl; do
    [ -e "$work/ku/$f" ] && cp "$work/ku/$f" "$out/ku_$f"
done
{
    echo; echo "== knowledge update (the end of $work/knowledge_update.log)"
    tail -n 40 "$work/knowledge_update.log" 2>/dev/null
    echo "facts_final: $(( $(date +%s) - start )) s"
} >> "$out/log.txt"
tail -n 8 "$out/log.txt"
echo "files in $out: $(find "$out" -type f | wc -l)"
