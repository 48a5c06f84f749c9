# Shared by the fleet benchmarks (sourced; not run on its own). Needs $w (a scratch directory,
# the current directory when the helpers run) and the pids array of the caller's cleanup.

# Starts Mosquitto on 127.0.0.1:$1 in $w (max_inflight_messages 0: see
# docs/mosquitto/tracefleet.conf).
start_mosquitto() {
  local mosq
  mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  printf 'user %s\nlistener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\nmax_inflight_messages 0\n' \
    "$(id -un)" "$1" > "$w/mosquitto.conf"
  "$mosq" -c "$w/mosquitto.conf" >"$w/mosquitto.log" 2>&1 & pids+=($!)
  sleep 0.3
}

now_ms() { date +%s%3N; }

# Polls learner.db's runs table every 10 ms from one process; prints the time (ms) the count
# reached $1.
wait_runs() {
  python3 - "$1" <<'PY'
import sqlite3, sys, time
n = int(sys.argv[1])
while True:
    try:
        c = sqlite3.connect('file:learner.db?mode=ro', uri=True)
        if c.execute('SELECT COUNT(*) FROM runs').fetchone()[0] >= n:
            print(int(time.time() * 1000)); break
        c.close()
    except sqlite3.Error:
        pass
    time.sleep(0.01)
PY
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
