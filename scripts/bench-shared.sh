#!/usr/bin/env bash
# Several `learner serve` instances behind one shared subscription (docs/clustered-broker.md)
# against one instance, side by side in each round on the same Mosquitto: 10 simulated
# devices send REPORTS (default 5000) reports each; time from starting them until the
# database holds them all. Rounds alternate which setup goes first; medians and the median
# of per-round ratios (results in docs/benchmarks.md).
#
#   scripts/bench-shared.sh [ROUNDS] [INSTANCES]      (defaults 5, 2)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
rounds=${1:-5}
instances=${2:-2}
devices=10
reports=${REPORTS:-5000}
cargo build --release --locked -p learner >/dev/null
L=$PWD/target/release/learner
w=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$w"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start_mosquitto "$port"
cd "$w"
total=$((devices * reports))

# measure N TAG: N serve instances (a shared group when N > 1), one fresh database; prints
# reports/s.
measure() {
  local n=$1 tag=$2 serves=() t0 t1
  rm -f learner.db* ./*.toml
  for i in $(seq "$n"); do
    {
      printf 'client_id = "bench-%s-%s"\ndb = "learner.db"\n' "$tag" "$i"
      [ "$n" -gt 1 ] && printf 'shared_group = "bench-%s"\n' "$tag"
      printf '[broker]\nport = %s\ninflight = 100\n' "$port"
    } > "serve-$i.toml"
    "$L" serve --config "serve-$i.toml" 2>"serve-$tag-$i.log" & serves+=($!)
  done
  sleep 1
  t0=$(now_ms)
  "$L" simulate --devices "$devices" --prefix "$tag" --reports "$reports" --duration 120s \
    --heartbeat-secs 3600 --config serve-1.toml >/dev/null & local sim=$!
  t1=$(wait_runs "$total")
  kill "$sim" "${serves[@]}"; wait "$sim" "${serves[@]}" 2>/dev/null || true
  awk -v n="$total" -v ms=$((t1 - t0)) 'BEGIN {printf "%.0f\n", n / (ms / 1000)}'
}

: > one.t; : > many.t; : > ratio.t
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then
    a=$(measure 1 "one$r"); b=$(measure "$instances" "many$r")
  else
    b=$(measure "$instances" "many$r"); a=$(measure 1 "one$r")
  fi
  echo "$a" >> one.t; echo "$b" >> many.t
  awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f\n", b / a}' >> ratio.t
done
echo "rounds, one instance: $(tr "\n" " " < one.t)  $instances instances: $(tr "\n" " " < many.t)"
echo "ingest: $devices devices x $reports reports, $rounds rounds alternating (median)"
echo "  one serve                      : $(median < one.t) reports/s"
echo "  $instances serve, shared subscription : $(median < many.t) reports/s"
echo "  ratio (median of rounds)       : $(median < ratio.t)x"
