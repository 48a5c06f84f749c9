#!/usr/bin/env bash
# A foreach-style judgement workload through `follower eval`, batched with prefix reuse
# against the one-context-per-request path it replaces, side by side (interleaved rounds,
# alternating which goes first), same model, same threads, same items.
#
#   scripts/bench-batch.sh [ROUNDS] [ITEMS] [THREADS]   (defaults 3, 120, the physical cores)
#   SET=dpkg-action scripts/bench-batch.sh              (a labelled set of traces/eval/)
#   MODEL=path/to.gguf PARALLEL=8 BIN=target/debug/follower scripts/bench-batch.sh
#
# Configurations: `--no-prompt-cache --parallel 1` (a fresh context per item, the code before
# #21), `--parallel 1` (prefix reuse only) and `--parallel $PARALLEL` (reuse and batching).
# Prints each run and the medians: items/s, the prompt-equivalent rate (every item's whole
# prompt over the wall time), cached prompt tokens, accuracy. Not yet: llama-server with
# --parallel and cache_prompt on the same prompts (issue #21). Figures go into
# docs/benchmarks.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
items=${2:-120}
set_name=${SET:-dpkg-action}
parallel=${PARALLEL:-8}
model=${MODEL:-$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$model" ] || model=$(models/fetch.sh)
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -p follower >/dev/null
  BIN=$PWD/target/release/follower
fi
threads=${3:-$("$BIN" telemetry --json | python3 -c 'import sys, json; print(json.load(sys.stdin)["cpus"])')}

w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
configs=("--no-prompt-cache --parallel 1" "--parallel 1" "--parallel $parallel")
names=(per-request reuse "reuse+batch$parallel")
echo "model $model, $threads threads, set $set_name, $items items, $rounds rounds"
run() { # round, config index
  # shellcheck disable=SC2086
  "$BIN" --state-dir "$w/state" eval "traces/eval/$set_name.trace.md" --step 1 \
    --dataset "traces/eval/$set_name.jsonl" --model "$model" --limit "$items" \
    --threads "$threads" --json ${configs[$2]} > "$w/r$1-c$2.json"
}
for r in $(seq 1 "$rounds"); do
  # Alternate the order, so that a trend in the machine's speed favours none.
  if [ $((r % 2)) -eq 1 ]; then order="0 1 2"; else order="2 1 0"; fi
  for c in $order; do run "$r" "$c"; done
done
python3 - "$w" "$rounds" "${names[@]}" <<'PY'
import json, statistics, sys
w, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"{'config':<16} {'round':>5} {'items/s':>8} {'prompt-eq tok/s':>16} {'cached':>7} {'prompt':>7} {'accuracy':>8}")
med = {}
for c, name in enumerate(names):
    runs = [json.load(open(f"{w}/r{r}-c{c}.json")) for r in range(1, rounds + 1)]
    for r, x in enumerate(runs, 1):
        print(f"{name:<16} {r:>5} {x['items_per_sec']:>8.3f} {x['prompt_equivalent_tokens_per_sec']:>16.1f} "
              f"{x['cached_prompt_tokens']:>7} {x['prompt_tokens']:>7} {x['accuracy']:>8.3f}")
    med[name] = statistics.median(x["items_per_sec"] for x in runs)
base = med[names[0]]
print("medians, items/s:", ", ".join(f"{n} {v:.3f} ({v / base:.1f}x)" for n, v in med.items()))
PY
