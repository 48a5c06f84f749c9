#!/usr/bin/env bash
# The follower's footprint: size of the size-optimised release binary (x86_64, CPU, llama.cpp
# linked in), stripped, and the resident memory of `follower agent` idle (connected to a
# broker, no model loaded), sampled ROUNDS times after it settles.
#
#   scripts/bench-footprint.sh [ROUNDS]      (default 5; results in docs/benchmarks.md)
#
# Needs mosquitto (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
# Built alone: building it together with the learner would unify their dependencies' features.
cargo build --release --locked -p follower >/dev/null
cargo build --release --locked -p learner >/dev/null
F=$PWD/target/release/follower
L=$PWD/target/release/learner
w=$(mktemp -d)
cleanup() {
  [ -n "${agent:-}" ] && kill "$agent" 2>/dev/null || true
  [ -n "${broker:-}" ] && kill "$broker" 2>/dev/null || true
  rm -rf "$w"
}
trap cleanup EXIT

strip -o "$w/follower.stripped" "$F"
size=$(stat -c %s "$w/follower.stripped")
echo "follower stripped: $size bytes ($(python3 -c "print(round($size / 1e6, 2))") MB); as built: $(stat -c %s "$F") bytes"
size -A "$w/follower.stripped" | awk '$1 ~ /^\./ && $2 > 100000 { printf "  %-18s %9d\n", $1, $2 }'

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" > "$w/mosquitto.conf"
mosquitto -c "$w/mosquitto.conf" >/dev/null 2>&1 &
broker=$!
printf 'device_id = "footprint"\nheartbeat_secs = 1\n[broker]\nport = %s\n' "$port" > "$w/follower.toml"
(cd "$w" && "$L" keys generate --role root --out root.key >/dev/null \
  && "$L" keys generate --role traces --out traces.key >/dev/null \
  && "$L" trust create --version 1 --root-key root.key.pub --traces-key traces.key.pub \
    --sign root.key -o root-v1.tfr >/dev/null \
  && TRACEFLEET_STATE_DIR="$w/state" "$F" trust init root-v1.tfr >/dev/null)
TRACEFLEET_STATE_DIR="$w/state" "$F" agent --config "$w/follower.toml" 2>"$w/agent.log" &
agent=$!
sleep 3
for r in $(seq 1 "$rounds"); do
  sleep 2
  kill -0 "$agent" || { cat "$w/agent.log"; exit 1; }
  echo "round $r: agent $(grep -E '^(VmRSS|VmHWM)' /proc/$agent/status | tr -s ' \t' ' ' | tr '\n' ' ')"
done
