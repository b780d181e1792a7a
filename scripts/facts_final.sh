#!/usr/bin/env bash
# The facts experiment's final configuration, one command on one GPU (RESULTS.md, F):
# 1. configs/sweeps/facts_final.yaml, 14 runs at once: the Memory+ / FLOPs-matched dense pair with 3 seeds each,
#    and exact match against memory size (128^2..512^2 values) in place of the layer-2 FFN, of the layer-1 FFN,
#    and beside the layer-2 FFN;
# 2. as soon as the pair's seed-0 memory run has finished (its final checkpoint), a knowledge update from it:
#    new people taught by finetuning only the memory, only the FFNs, or everything (scripts/knowledge_update.py).
# OUT gets only a few files, at its top level: results.md / results.jsonl / seeds.json (the sweep's tables),
# em_vs_memory_size.png, loss_vs_flops.png, ku_results.md / ku_results.jsonl (the knowledge update), sweep.log and
# knowledge_update.log (its tail). Data, runs and full logs stay in WORK. Everything ends within TOTAL_S seconds.
#   bash scripts/facts_final.sh OUT [key=value ...]
# key=value: extra overrides for every run (e.g. train.device=cpu train.steps=4 ... for a dry run);
# env: PYTHON (python3), WORK (/tmp/facts_final), TOTAL_S (345: the whole command), SWEEP_S (235: the sweep),
# ENTITIES_SCALE (1), KU_STEPS (300), KU_LR (3e-3), KU_MODES (memory,ffn,all), KU_NEW (50: new people),
# KU_REPLAY (0.5: share of the finetuning tokens from the pretraining mixture).
set -u
out=${1:?usage: bash scripts/facts_final.sh OUT [key=value ...]}
shift
py=${PYTHON:-python3}
work=${WORK:-/tmp/facts_final}
total=${TOTAL_S:-345}
scale=${ENTITIES_SCALE:-1}
start=$(date +%s)
mkdir -p "$out" "$work"
rm -rf "$work/runs" "$work/ku"  # a rerun into the same WORK must not reuse an old base or old metrics

$py scripts/facts_sweep.py --sweep configs/sweeps/facts_final.yaml --out "$out" --work "$work" --parallel 14 \
    --total-s "${SWEEP_S:-235}" --stop-grace-s 15 --entities-scale "$scale" --no-run-files "$@" 2>&1 \
    | tee "$out/sweep.log" &
sweep=$!

# The base of the knowledge update: the sweep's seed-0 Memory+ run, trained on the same people (same generator
# seed and count: the update's "old" people), with its final checkpoint.
base="$work/runs/mem_s0"
until [ -e "$base/summary.json" ] || ! kill -0 "$sweep" 2>/dev/null; do sleep 2; done
left=$((total - ($(date +%s) - start) - 10))
entities=$($py -c "print(max(4, round(5000 * $scale)))")  # facts_sweep's rule for the scaled p5k set
if [ -e "$base/summary.json" ] && [ "$left" -gt 0 ]; then
    echo "knowledge update from $base ($left s left)"
    timeout -k 5 "$left" $py scripts/knowledge_update.py --out "$work/ku" --base "$base" \
        --config configs/facts_gpu.yaml --entities "$entities" --new-entities "${KU_NEW:-50}" \
        --steps "${KU_STEPS:-300}" --lr "${KU_LR:-3e-3}" --modes "${KU_MODES:-memory,ffn,all}" \
        --replay-share "${KU_REPLAY:-0.5}" --parallel 4 "$@" > "$work/knowledge_update.log" 2>&1
    echo "knowledge update: exit $? (124: stopped at the time limit; its log: $work/knowledge_update.log)"
else
    echo "knowledge update skipped: no finished base run at $base"
fi
wait "$sweep"
tail -n 60 "$work/knowledge_update.log" > "$out/knowledge_update.log" 2>/dev/null
for f in results.md results.jsonl; do
    [ -e "$work/ku/$f" ] && cp "$work/ku/$f" "$out/ku_$f"
done
cat "$out/ku_results.md" 2>/dev/null || tail -n 20 "$out/knowledge_update.log"
echo "facts_final: $(( $(date +%s) - start )) s; files in $out: $(find "$out" -type f | wc -l)"
