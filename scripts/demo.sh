#!/usr/bin/env bash
# The main job, end to end, on this machine (README, "Two commands"):
#   a learner (`learner serve` with its embedded MQTT broker) and three devices (`follower
#   agent`, each with its own state directory and site), a signed example trace rolled out
#   canary-first, runs on real input (this machine's /var/log/dpkg.log) with SmolLM2 for the
#   LLM step, reports flowing back; on one device the log was just rotated, its run fails and
#   escalates; the learner regenerates the trace by itself (through Claude with
#   ANTHROPIC_API_KEY set, else through a clearly labelled RECORDED reply), signs it, canaries
#   it and rolls it out fleet-wide; every device runs it; the fleet table, the costs, the
#   experiences exported as memory_log.md. Then the USB path:
#   a signed bundle installed on a device that never connects.
# Everything lands in a fresh directory (or $TRACEFLEET_DEMO_DIR); nothing outside it changes.
# TRACEFLEET_PROFILE=dev uses the debug build (what the tests build) instead of release.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
root=$PWD
if [ "${TRACEFLEET_PROFILE:-release}" = dev ]; then
  # The same invocation as scripts/test.sh: after the tests, nothing is rebuilt.
  cargo build --workspace --all-targets --locked >&2
  bin=$root/target/debug
else
  cargo build --release --locked -p follower -p learner >&2
  bin=$root/target/release
fi
learner="$bin/learner"
follower="$bin/follower"
model="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
work=${TRACEFLEET_DEMO_DIR:-$(mktemp -d -t tracefleet-demo.XXXXXX)}
mkdir -p "$work"
cd "$work"
# Every learner action below (keys, trust root, signatures, rollouts, the regeneration, the
# bundle) is appended to this audit log; the demo verifies it at the end.
export TRACEFLEET_AUDIT_DIR="$work/audit"
started=$SECONDS
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

if [ -t 1 ]; then bold=$'\033[1m' inverse=$'\033[7m' plain=$'\033[0m'; else bold='' inverse='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
say() { printf '   %s\n' "$*"; }
die() {
  echo "demo: $*" >&2
  for f in serve.log devices/*.log api.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done
  exit 1
}
# json CMD… -- PYTHON-EXPR: evaluates EXPR with `j` = the command's JSON output.
json() {
  local args=()
  while [ "$1" != -- ]; do args+=("$1"); shift; done
  shift
  "${args[@]}" | python3 -c "import json,sys; j=json.load(sys.stdin); print($1)"
}
# wait_for SECS WHAT PYTHON-COND: polls `learner runs --json` (as `j`) until COND holds.
wait_for() {
  local secs=$1 what=$2 cond=$3 t=$SECONDS
  until [ "$(json "$learner" runs list --config learner.toml --json -- "bool($cond)")" = True ]; do
    [ $((SECONDS - t)) -ge "$secs" ] && die "timed out after ${secs}s waiting for $what"
    sleep 0.5
  done
}
runs_of() { echo "sum(1 for r in j['runs'] if r['device_id'] == '$1')"; }
# run_on DEVICE VERSION STATUS [TRACE VAR=VALUE]: a signed command to run the trace (default
# dpkg-log-triage on the device's site log) on the device; waits for its report and checks that
# it is of VERSION and ended with STATUS (the demo fails if not).
run_on() {
  local d=$1 version=$2 expect=$3 trace=${4:-dpkg-log-triage} var=${5:-log_path=$work/sites/$1/dpkg.log} before got
  before=$(json "$learner" runs list --config learner.toml --json -- "$(runs_of "$d")")
  "$learner" command "$d" run "$trace" --var "$var" \
    --key commands.key --config learner.toml >/dev/null
  wait_for 180 "a report from $d" "$(runs_of "$d") > $before"
  json "$learner" runs list --config learner.toml --json -- \
    "'   ' + [f\"{r['device_id']}: run {r['run_id'][:13]}… of {r['trace_id']} {r['trace_version']}: {r['status']}\" for r in j['runs'] if r['device_id'] == '$d'][-1]"
  got=$(json "$learner" runs list --config learner.toml --json -- \
    "[r['trace_version'] + ' ' + r['status'] for r in j['runs'] if r['device_id'] == '$d'][-1]")
  [ "$got" = "$version $expect" ] || die "$d ran $got: expected $version $expect"
}
acked_by_all() { echo "sum(1 for a in j['acks'] if a['version'] == '$1' and a['outcome'] in ('installed', 'already_installed')) >= 3"; }
canary_of() {  # VERSION [TRACE]
  json "$learner" rollout status --config learner.toml --json -- \
    "[r for r in j if r['version'] == '$1' and r['trace_id'] == '${2:-dpkg-log-triage}'][0]['waves'][0][0]"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

step "learner: keys (root kept offline; trace and command signing) and the fleet's trust root v1"
for role in root traces commands; do "$learner" keys generate --role $role --out $role.key; done
"$learner" trust create --version 1 --expires 365d --root-key root.key.pub \
  --traces-key traces.key.pub --commands-key commands.key.pub --sign root.key -o root-v1.tfr

step "learner: the model that regenerates failing traces"
if [ -n "${ANTHROPIC_API_KEY:-}" ]; then
  backend="kind = \"anthropic\"
model = \"${TRACEFLEET_DEMO_MODEL:-claude-sonnet-4-5}\"
api_key_env = \"ANTHROPIC_API_KEY\""
  say "Claude through the Anthropic Messages API (ANTHROPIC_API_KEY is set)"
else
  python3 "$root/scripts/recorded-messages-api.py" --port-file api.port \
    --reply "$root/traces/recorded/dpkg-log-triage-1.1.0.reply.md" 2>api.log &
  pids+=($!)
  for _ in $(seq 100); do [ -s api.port ] && break; sleep 0.1; done
  [ -s api.port ] || die "the recorded Messages API did not start"
  export TRACEFLEET_DEMO_KEY=recorded-not-a-key
  backend="kind = \"anthropic\"
base_url = \"http://127.0.0.1:$(cat api.port)\"
model = \"recorded-reply\"
api_key_env = \"TRACEFLEET_DEMO_KEY\""
  printf '   %s RECORDED %s no ANTHROPIC_API_KEY: the regeneration below is answered by a local\n' "$inverse" "$plain"
  say "Messages-API stand-in replaying traces/recorded/dpkg-log-triage-1.1.0.reply.md — not a live model."
  say "Set ANTHROPIC_API_KEY to have Claude write it."
fi

port=$(free_port)
cat >learner.toml <<EOF
# The embedded broker (rumqttd) on loopback; the learner regenerates failing traces itself.
[embedded]
listen = "127.0.0.1:$port"

[backend]
$backend

[regenerate]
keys = ["traces.key"]
out_dir = "regenerated"
canary = "1"
waves = ["*"]
abort_if = "failure-rate>0.5 over 1 runs"

# Each candidate is run once with the follower's engine on the failing run's inputs first.
[dry_run]
follower = "$follower"
model = "$model"
read_roots = ["$work/sites"]
threads = 2
EOF
step "learner serve: embedded MQTT broker on 127.0.0.1:$port, ingest, rollouts, regeneration"
RUST_LOG=info "$learner" serve --config learner.toml 2>serve.log &
pids+=($!)

step "three devices, each with its own state directory, the trust root and the model registered"
mkdir -p sites devices
[ -r /var/log/dpkg.log ] || die "/var/log/dpkg.log is not readable: the demo's real input"
for d in pi-01 pi-02 pi-03; do
  mkdir -p "sites/$d"
  "$follower" --state-dir "devices/$d" trust init root-v1.tfr >/dev/null
  "$follower" --state-dir "devices/$d" models add "$model" --manifest "$root/models/models.toml" >/dev/null 2>&1
  cat >"devices/$d.toml" <<EOF
device_id = "$d"
heartbeat_secs = 1
run_args = ["--threads", "2", "--read-root", "$work/sites/$d"]

[broker]
host = "127.0.0.1"
port = $port
EOF
  RUST_LOG=info "$follower" --state-dir "devices/$d" agent --config "devices/$d.toml" 2>"devices/$d.log" &
  pids+=($!)
done
for d in pi-01 pi-02 pi-03; do cp /var/log/dpkg.log "sites/$d/dpkg.log"; done
t=$SECONDS
until [ "$(json "$learner" devices list --config learner.toml --json -- "sum(1 for d in j if d['online'])" 2>/dev/null)" = 3 ]; do
  [ $((SECONDS - t)) -ge 60 ] && die "the devices did not come online"
  sleep 0.5
done
"$learner" devices list --config learner.toml | sed 's/^/   /'

step "learner: compile and sign the example trace dpkg-log-triage 1.0.0; roll it out, one canary first"
"$learner" compile "$root/traces/dpkg-log-triage.trace.md" -o dpkg-log-triage-1.0.0.tfc
"$learner" sign dpkg-log-triage-1.0.0.tfc --key traces.key --expires 30d -o dpkg-log-triage-1.0.0.tfs
"$learner" rollout start dpkg-log-triage-1.0.0.tfs --source "$root/traces/dpkg-log-triage.trace.md" \
  --canary 1 --waves '*' --abort-if 'failure-rate>0.5 over 1 runs' --config learner.toml | sed 's/^/   /'
wait_for 60 "the canary's install" "any(a['version'] == '1.0.0' for a in j['acks'])"
canary=$(canary_of 1.0.0)
say "canary: $canary — it runs first; the fleet gets the trace only after a good run there"
# Every site has this machine's dpkg log; on one device that is not the canary logrotate has
# just run: its current log holds only dpkg's start-up lines, the rest is in dpkg.log.1.
rotated=$(for d in pi-01 pi-02 pi-03; do [ "$d" = "$canary" ] || echo "$d"; done | tail -1)
mv "sites/$rotated/dpkg.log" "sites/$rotated/dpkg.log.1"
printf '%s startup archives unpack\n%s startup packages configure\n' "$(date '+%F %T')" "$(date '+%F %T')" >"sites/$rotated/dpkg.log"
say "on $rotated the log was rotated a moment ago"
run_on "$canary" 1.0.0 success
wait_for 60 "every device's install of 1.0.0" "$(acked_by_all 1.0.0)"
say "the rollout reached the whole fleet"

step "every other device runs it on its own log (SmolLM2 judges the risk in-process)"
for d in pi-01 pi-02 pi-03; do
  [ "$d" = "$canary" ] && continue
  if [ "$d" = "$rotated" ]; then run_on "$d" 1.0.0 failed; else run_on "$d" 1.0.0 success; fi
done
json "$learner" runs list --config learner.toml --json -- \
  "'\n'.join(f\"   escalation from {e['device_id']}: {e['reason']}\" for e in j['escalations'])"

step "learner: the escalation sets off a regeneration; the result is signed and canaried"
wait_for 120 "the regeneration" "any(r['outcome'] == 'compiled' for r in j['regenerations'])"
json "$learner" runs list --config learner.toml --json -- \
  "'\n'.join(f\"   {r['trace_id']} {r['from_version']} → {r['to_version']} by {r['model']} in {r['rounds']} round(s), {r['input_tokens']}+{r['output_tokens']} tokens, \${r['cost']:.4f}; trigger: {r['trigger'][:90]}\" for r in j['regenerations'])"
json "$learner" runs list --config learner.toml --json -- \
  "'   ' + [r for r in j['regenerations'] if r['outcome'] == 'compiled'][0]['detail'].split('; signed')[0]"
[ -n "${ANTHROPIC_API_KEY:-}" ] || say "(RECORDED reply: model \"recorded-reply\", token counts estimated by the stand-in)"
say "new source: $work/regenerated/dpkg-log-triage-1.1.0.trace.md"
wait_for 60 "the canary's install of 1.1.0" "any(a['version'] == '1.1.0' for a in j['acks'])"
canary=$(canary_of 1.1.0)
say "canary: $canary"
run_on "$canary" 1.1.0 success
wait_for 60 "every device's install of 1.1.0" "$(acked_by_all 1.1.0)"
say "1.1.0 reached the whole fleet"

step "every other device runs 1.1.0 — $rotated included"
for d in pi-01 pi-02 pi-03; do [ "$d" = "$canary" ] || run_on "$d" 1.1.0 success; done

step "a judgement step that carries reference answers: a device's model must repeat them first"
"$learner" compile "$root/traces/service-protocol.trace.md" -o service-protocol-1.0.0.tfc
"$learner" sign service-protocol-1.0.0.tfc --key traces.key --expires 30d -o service-protocol-1.0.0.tfs
"$learner" rollout start service-protocol-1.0.0.tfs --source "$root/traces/service-protocol.trace.md" \
  --canary 1 --waves '*' --config learner.toml | sed 's/^/   /'
wait_for 60 "the canary's install of service-protocol" \
  "any(a['trace_id'] == 'service-protocol' and a['outcome'] == 'installed' for a in j['acks'])"
canary=$(canary_of 1.0.0 service-protocol)
run_on "$canary" 1.0.0 failed service-protocol "entry=ntp 123/___ # Network Time Protocol"
json "$learner" runs list --config learner.toml --json -- \
  "'   ' + [e for e in j['escalations'] if e['trace_id'] == 'service-protocol'][-1]['reason']"
say "SmolLM2 answers tcp to all six reference entries, the udp ones too: instead of writing an"
say "answer nobody checked, the run escalated before the step, and the rollout stops at the canary"

step "the fleet"
"$learner" fleet --config learner.toml | sed 's/^/   /'
echo
"$learner" rollout status --config learner.toml | sed 's/^/   /'

step "what learning cost against what the runs took (measured), and the experiences"
"$learner" costs --config learner.toml | sed 's/^/   /'
"$learner" memory export -o memory_log.md --config learner.toml | sed 's/^/   /'
"$learner" memory query --outcome failure --config learner.toml | cut -c1-160 | sed 's/^/   /'

step "the USB path: a signed bundle for a device that never connects"
"$learner" bundle create -o usb.tfb regenerated/dpkg-log-triage-1.1.0.tfs --model "$model" \
  --trust-root root-v1.tfr --key traces.key | sed 's/^/   /'
mkdir -p sites/air-01
cp /var/log/dpkg.log sites/air-01/dpkg.log
"$follower" --state-dir devices/air-01 trust init root-v1.tfr | sed 's/^/   /'
"$follower" --state-dir devices/air-01 install usb.tfb | sed 's/^/   /'
"$follower" --state-dir devices/air-01 run dpkg-log-triage --threads 2 --read-root "$work/sites/air-01" \
  --var "log_path=$work/sites/air-01/dpkg.log" --base-dir sites/air-01/run --output usb-report.json | sed 's/^/   /'

step "the audit log: every action that changed what devices trust or run, chained and signed"
"$learner" audit list 2>/dev/null | tail -6 | cut -c1-140 | sed 's/^/   /'
"$learner" audit verify | sed 's/^/   /' || die "the audit log does not verify"

step "done in $((SECONDS - started)) s — everything is in $work"
