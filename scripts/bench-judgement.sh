#!/usr/bin/env bash
# Judgement quality on the labelled sets of traces/eval/: `follower eval` for each model
# (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M) × set × few-shot (0 and K), JSON per
# run under $OUT, then one Markdown table (accuracy, majority baseline, macro-F1, ECE, the
# best threshold whose selective accuracy reaches 0.95 with its coverage, items/s).
#
#   scripts/bench-judgement.sh [OUT_DIR] [K] [LIMIT]
#
# Uses the follower binary of $TRACEFLEET_PROFILE (default release; `dev` for target/debug).
# Figures of accuracy are deterministic (greedy decoding); items/s is the machine's and
# shared with whatever else runs — quote medians of repeated runs for speed claims.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench-judgement}
k=${2:-4}
limit=${3:-}
profile=${TRACEFLEET_PROFILE:-release}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
cargo build --profile "$profile" -p follower --locked >&2
bin=target/$dir/follower
mkdir -p "$out"
export TRACEFLEET_STATE_DIR="$out/state"
models=("models/SmolLM2-135M-Instruct.Q4_1.gguf" "models/gemma-3-270m-Q4_K_M.gguf")
for m in "${models[@]}"; do [ -f "$m" ] || { echo "error: $m missing: run models/fetch.sh" >&2; exit 2; }; done
for set in services-protocol dpkg-action deb-section; do
  for m in "${models[@]}"; do
    for shots in 0 "$k"; do
      name="$(basename "$m" .gguf)-$set-k$shots"
      echo "== $name" >&2
      "$bin" eval "traces/eval/$set.trace.md" --step 1 --dataset "traces/eval/$set.jsonl" \
        --model "$m" --few-shot "$shots" ${limit:+--limit "$limit"} --json > "$out/$name.json"
    done
  done
done
python3 - "$out" <<'PY'
import json, sys, glob, os
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    e = json.load(open(f))
    best = None
    for p in e["selective_curve"]:
        if p["selective_accuracy"] >= 0.95 and p["coverage"] > 0 and (best is None or p["coverage"] > best["coverage"]):
            best = p
    sel = f'{best["threshold"]:.3g} → {best["selective_accuracy"]:.3f} at coverage {best["coverage"]:.2f}' if best else "none reaches 0.95"
    top = max(e["selective_curve"], key=lambda p: (p["selective_accuracy"] if p["coverage"] > 0 else 0))
    rows.append((os.path.basename(e["dataset"]).replace(".jsonl", ""), e["model"], e["few_shot"], e["items"],
                 e["accuracy"], e["majority_baseline"], e["macro_f1"], e["ece"], sel,
                 f'{top["threshold"]:.3g}: {top["selective_accuracy"]:.3f} at {top["coverage"]:.2f}', e["items_per_sec"]))
print("| set | model | few-shot | items | accuracy | majority | macro-F1 | ECE | selective ≥ 0.95 (threshold → sel. acc. at coverage) | best selective point | items/s |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {'-' if r[7] is None else f'{r[7]:.3f}'} | {r[8]} | {r[9]} | {r[10]:.2f} |")
PY
