#!/usr/bin/env bash
# Smoke test of a cross-built follower under qemu-user: `follower --version`, a deterministic
# example trace (signed, on this machine's /etc/services) and an LLM step with the SmolLM2
# model (JSON-schema constrained). Speed under qemu means nothing (≈ 13× slower).
#
#   cross/smoke.sh [aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf]
#
# Needs cross/build.sh TARGET first, and qemu-user. The learner used to sign runs natively.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-aarch64-unknown-linux-gnu}
case $target in
  aarch64-unknown-linux-gnu) qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu) ;;
  armv7-unknown-linux-gnueabihf) qemu=(qemu-arm -L /usr/arm-linux-gnueabihf) ;;
  *) echo "error: unknown target $target" >&2; exit 2 ;;
esac
F=$PWD/target/$target/release/follower
[ -x "$F" ] || { echo "error: $F missing: run cross/build.sh $target first" >&2; exit 2; }
model=$(models/fetch.sh)
cargo build --release --locked -p learner >/dev/null
L=$PWD/target/release/learner
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
follower() { (cd "$w" && "${qemu[@]}" "$F" --state-dir "$w/state" "$@"); }

echo "== follower --version"
follower --version

echo "== a deterministic trace, signed (services-audit on /etc/services)"
(cd "$w" && "$L" keys generate --role root --out root.key >/dev/null \
  && "$L" keys generate --role traces --out traces.key >/dev/null \
  && "$L" trust create --version 1 --root-key root.key.pub --traces-key traces.key.pub \
       --sign root.key -o root-v1.tfr >/dev/null \
  && "$L" compile "$OLDPWD/traces/services-audit.trace.md" -o services.tfc >/dev/null \
  && "$L" sign services.tfc --key traces.key -o services.tfs >/dev/null)
follower trust init root-v1.tfr
follower run services.tfs --base-dir audit --output audit.json
python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); assert r["status"]=="success", r; print("status", r["status"], "steps", r["completed_steps"])' "$w/audit.json"

echo "== an LLM step with SmolLM2 (json_schema)"
cat > "$w/classify.trace.md" <<'TRACE'
---
trace_id: classify-line
version: "1.0.0"
goal_signature: classify a log line
---
### Step 1: Classify
**Tool Call**:
```yaml
tool: LLM
parameters:
  prompt: "Is this log line an error? Line: 'kernel: EXT4-fs error (device sda1): remounting read-only'"
  max_tokens: 48
  json_schema:
    type: object
    required: [error]
    additionalProperties: false
    properties:
      error: {type: boolean}
```
TRACE
follower run classify.trace.md --allow-unsigned --model "$model" --threads 2 --base-dir llm --output llm.json
python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))
assert r["status"] == "success", r
s = r["step_results"][0]
print("output", s["output"], "model", s["llm"]["model"], "tokens", s["llm"]["completion_tokens"])
assert isinstance(json.loads(s["output"])["error"], bool)
' "$w/llm.json"
echo "smoke test on $target under qemu: passed"
