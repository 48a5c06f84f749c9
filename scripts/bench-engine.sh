#!/usr/bin/env bash
# Whole-process overhead of `follower run` against a plain shell script running the same
# 20 commands, side by side (interleaved), on this machine's /var/log/dpkg.log.
#
#   scripts/bench-engine.sh [ITERATIONS]     (default 30; results in docs/benchmarks.md)
#
# The follower run includes everything a device does: start, open the store, verify the
# signed trace against the trust root, check the shell policy, apply Landlock, run each step
# under /bin/sh with rlimits, journal each step in SQLite before the next, write the report.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-30}
cargo build --release --locked -p follower -p learner >/dev/null
F=$PWD/target/release/follower
L=$PWD/target/release/learner
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
log=/var/log/dpkg.log
[ -r "$log" ] || { echo "needs a readable $log" >&2; exit 1; }

cmds=(
  "grep -c ' install ' $log"
  "grep -c ' upgrade ' $log"
  "grep -c ' remove ' $log"
  "wc -l < $log"
  "awk '{print \$3}' $log | sort | uniq -c | sort -rn"
  "cut -d' ' -f1 $log | sort -u | tail -n 5"
  "tail -n 50 $log"
  "head -n 50 $log"
  "grep ' status installed ' $log | wc -l"
  "awk '{print \$4}' $log | sort | uniq | wc -l"
  "grep -E ' (install|upgrade) ' $log | tail -n 20"
  "sort -k4 $log | head -n 10"
  "cut -d' ' -f4 $log | cut -d: -f1 | sort -u | wc -l"
  "grep -v ' status ' $log | wc -l"
  "awk 'length > 80' $log | wc -l"
  "tr -s ' ' < $log | cut -d' ' -f3 | sort | uniq -c"
  "grep -c 'configure' $log"
  "sed -n '1,20p' $log"
  "md5sum $log"
  "ls -l $log"
)
{
  printf -- '---\ntrace_id: bench-20-steps\nversion: "1.0.0"\ngoal_signature: summarise the dpkg log\n---\n'
  i=1
  for c in "${cmds[@]}"; do
    esc=${c//\\/\\\\}; esc=${esc//\"/\\\"}
    printf '### Step %d: command %d\n**Tool Call**:\n```yaml\ntool: Bash\nparameters:\n  command: "%s"\n```\n' "$i" "$i" "$esc"
    i=$((i + 1))
  done
} > "$w/bench.trace.md"
{ echo '#!/bin/sh'; for c in "${cmds[@]}"; do echo "$c > /dev/null"; done; } > "$w/bench.sh"

export TRACEFLEET_STATE_DIR=$w/state
(cd "$w"
 "$L" keys generate --role root --out root.key >/dev/null
 "$L" keys generate --out traces.key >/dev/null
 "$L" trust create --version 1 --expires 30d --root-key root.key.pub --traces-key traces.key.pub \
   --traces-threshold 1 --sign root.key -o root.tfr >/dev/null
 "$L" compile bench.trace.md -o bench.tfc >/dev/null
 "$L" sign bench.tfc --key traces.key -o bench.tfs >/dev/null
 "$F" trust init root.tfr >/dev/null)

ns() { date +%s%N; }
: > "$w/follower.t"; : > "$w/script.t"
for _ in $(seq "$n"); do
  t0=$(ns); "$F" run "$w/bench.tfs" --fresh >/dev/null; t1=$(ns)
  /bin/sh "$w/bench.sh"; t2=$(ns)
  echo $(((t1 - t0) / 1000)) >> "$w/follower.t"
  echo $(((t2 - t1) / 1000)) >> "$w/script.t"
done
median() { sort -n "$1" | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2))}'; }
mf=$(median "$w/follower.t"); ms=$(median "$w/script.t")
echo "20-step Bash trace, $n interleaved runs each (median wall time):"
echo "  follower run : $((mf / 1000)).$(printf '%03d' $((mf % 1000))) ms"
echo "  shell script : $((ms / 1000)).$(printf '%03d' $((ms % 1000))) ms"
awk -v f="$mf" -v s="$ms" 'BEGIN {printf "  ratio        : %.2fx the shell script (goal <= 1.2x)\n", f / s}'
