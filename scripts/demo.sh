#!/usr/bin/env bash
# The main job, end to end on this machine's real data:
#   generate root and trace-signing keys → create the trust root → compile the example trace →
#   sign it → provision the follower with the root → install the signed trace → run it on
#   /var/log/dpkg.log with the in-process model → print the report.
# Everything lands in a fresh directory (or $TRACEFLEET_DEMO_DIR); nothing outside it changes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -p follower -p learner >&2
root=$PWD
learner="$root/target/release/learner"
follower="$root/target/release/follower"
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
work=${TRACEFLEET_DEMO_DIR:-$(mktemp -d -t tracefleet-demo.XXXXXX)}
mkdir -p "$work"
cd "$work"
export TRACEFLEET_STATE_DIR="$work/state"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
step "learner: generate a root key (kept offline) and a trace-signing key"
"$learner" keys generate --role root --out root.key
"$learner" keys generate --role traces --out traces.key
step "learner: create the fleet's trust root v1 (root and trace-signing keys, thresholds)"
"$learner" trust create --version 1 --expires 365d --root-key root.key.pub \
  --traces-key traces.key.pub --sign root.key -o root-v1.tfr
step "learner: compile the example trace"
"$learner" compile "$root/traces/dpkg-log-triage.trace.md" -o dpkg-log-triage.tfc
step "learner: sign it"
"$learner" sign dpkg-log-triage.tfc --key traces.key --expires 30d -o dpkg-log-triage.tfs
step "follower: provision the device with the trust root, install the signed trace"
"$follower" trust init root-v1.tfr
"$follower" install dpkg-log-triage.tfs
step "follower: verify and run the signed trace on /var/log/dpkg.log"
status=0
"$follower" run dpkg-log-triage --model "$model" --base-dir run --output report.json || status=$?
step "the report ($work/report.json)"
cat report.json
if [ -f run/dpkg-triage-report.md ]; then
  step "what the trace wrote ($work/run/dpkg-triage-report.md)"
  cat run/dpkg-triage-report.md
fi
exit "$status"
