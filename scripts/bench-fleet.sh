#!/usr/bin/env bash
# Fleet-link benchmarks against a real Mosquitto on a free loopback port (results in
# docs/benchmarks.md):
#   1. ingest: 10 simulated devices send REPORTS (default 5000) reports each; time from
#      starting them until `learner serve` has stored them all, side by side with the
#      broker's own QoS 1 throughput under the same load — 10 publishers of the same client
#      library, the same message size — into a subscriber that stores nothing
#      (`learner simulate --broker-baseline`), interleaved, medians;
#   2. backlog: the same reports queued in the broker while `serve` is down, drained after it
#      starts (Mosquitto only: the embedded broker stops with `serve`);
#   3. rollout: time from `learner rollout start` to every one of FLEET simulated devices'
#      acks (waves: 1% canary, then the rest).
#
#   scripts/bench-fleet.sh [ROUNDS] [FLEET]      (defaults 3, 1000)
#   BROKER=embedded scripts/bench-fleet.sh …      the broker embedded in `learner serve`
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
rounds=${1:-3}
fleet=${2:-1000}
devices=10
reports=${REPORTS:-5000}
cargo build --release --locked -p learner >/dev/null
L=$PWD/target/release/learner
w=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$w"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
embedded=$([ "${BROKER:-mosquitto}" = embedded ] && echo 1 || echo 0)
if [ "$embedded" = 1 ]; then
  broker_toml() { printf '[embedded]\nlisten = "127.0.0.1:%s"\n' "$port"; }
else
  start_mosquitto "$port"
  broker_toml() { printf '[broker]\nport = %s\ninflight = 100\n' "$port"; }
fi
cd "$w"
sql() { python3 -c "import sqlite3,sys; print(sqlite3.connect('file:learner.db?mode=ro', uri=True).execute(sys.argv[1]).fetchone()[0])" "$1" 2>/dev/null || echo 0; }

total=$((devices * reports))
: > ingest.t; : > broker.t
for r in $(seq "$rounds"); do
  rm -f learner.db*
  # A fresh learner session per round: nothing queued for an earlier round reaches this one.
  { printf 'client_id = "bench-learner-%s"\n' "$r"; broker_toml; } > learner.toml
  "$L" serve --config learner.toml 2>serve.log & serve=$!
  sleep 0.5
  t0=$(now_ms)
  "$L" simulate --devices "$devices" --prefix "load$r" --reports "$reports" --duration 120s \
     --heartbeat-secs 3600 --config learner.toml >/dev/null & sim=$!
  t1=$(wait_runs "$total")
  kill "$sim"; wait "$sim" 2>/dev/null || true
  # The embedded broker lives in `serve`: measure it there (the learner does not subscribe
  # to the baseline's topic).
  [ "$embedded" = 1 ] || { kill "$serve"; wait "$serve" 2>/dev/null || true; }
  awk -v n="$total" -v ms=$((t1 - t0)) 'BEGIN {printf "%.0f\n", n / (ms / 1000)}' >> ingest.t
  "$L" simulate --broker-baseline --devices "$devices" --reports "$reports" --config learner.toml \
    | awk '{print $(NF-4)}' >> broker.t
  [ "$embedded" = 0 ] || { kill "$serve"; wait "$serve" 2>/dev/null || true; }
done
# 2. A backlog: the reports are queued in the broker while the learner is down (its
#    persistent session), then `learner serve` starts and drains them.
: > backlog.t
for r in $(seq "$rounds"); do
  [ "$embedded" = 0 ] || break
  rm -f learner.db*
  { printf 'client_id = "bench-backlog-%s"\n' "$r"; broker_toml; } > learner.toml
  "$L" serve --config learner.toml 2>serve.log & serve=$!
  sleep 0.5; kill "$serve"; wait "$serve" 2>/dev/null || true
  "$L" simulate --devices "$devices" --prefix "backlog$r" --reports "$reports" --duration 8s \
     --heartbeat-secs 3600 --config learner.toml >/dev/null
  t0=$(now_ms)
  "$L" serve --config learner.toml 2>serve.log & serve=$!
  t1=$(wait_runs "$total")
  kill "$serve"; wait "$serve" 2>/dev/null || true
  awk -v n="$total" -v ms=$((t1 - t0)) 'BEGIN {printf "%.0f\n", n / (ms / 1000)}' >> backlog.t
done
echo "rounds, learner: $(tr "\n" " " < ingest.t)  broker: $(tr "\n" " " < broker.t)  backlog: $(tr "\n" " " < backlog.t)"
mi=$(median < ingest.t); mb=$(median < broker.t); mq=$(median < backlog.t)
echo "broker: ${BROKER:-mosquitto}"
echo "ingest: $devices devices x $reports reports, $rounds rounds (median)"
echo "  learner serve, end to end : $mi reports/s"
echo "  broker alone (same load)  : $mb msg/s"
awk -v i="$mi" -v b="$mb" 'BEGIN {printf "  ratio                     : %.2fx (goal >= 0.7x)\n", i / b}'
[ "$embedded" = 1 ] || echo "  backlog drained by serve  : $mq reports/s (queued while it was down)"

# Rollout to the simulated fleet.
rm -f learner.db*
{ printf 'client_id = "bench-learner-rollout"\n'; broker_toml; } > learner.toml
"$L" serve --config learner.toml 2>serve.log & pids+=($!)
sleep 0.5
canary=$(( fleet / 100 > 0 ? fleet / 100 : 1 ))
"$L" simulate --devices "$fleet" --groups "canary=$canary,wave1=$((fleet - canary))" --run-on-install \
   --heartbeat-secs 5 --config learner.toml >/dev/null 2>&1 & pids+=($!)
until [ "$(sql 'SELECT COUNT(*) FROM devices')" -ge "$fleet" ]; do sleep 0.2; done
"$L" keys generate --out traces.key >/dev/null
printf -- '---\ntrace_id: fleet-bench\nversion: "1.0.0"\ngoal_signature: bench\n---\n### Step 1: s\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: "true"\n```\n' > t.trace.md
"$L" compile t.trace.md -o t.tfc >/dev/null
"$L" sign t.tfc --key traces.key -o t.tfs >/dev/null
t0=$(now_ms)
"$L" rollout start t.tfs --waves canary,wave1 --abort-if 'failure-rate>0.2 over 1 runs' --config learner.toml >/dev/null
acks() { sql "SELECT COUNT(*) FROM acks WHERE trace_id = 'fleet-bench'"; }
until [ "$(acks)" -ge "$fleet" ]; do sleep 0.1; done
t1=$(now_ms)
echo "rollout: $fleet simulated devices (waves: $canary canary, $((fleet - canary)) wave1)"
echo "  every ack received after : $((t1 - t0)) ms (goal <= 5000 ms)"
