#!/usr/bin/env bash
# Build the labelled evaluation sets of traces/eval/ from this machine's own files. The truth of
# every item is read mechanically from the file it comes from; the prompt variable hides it.
#
#   traces/eval/make-sets.sh [OUT_DIR]     # default OUT_DIR: traces/eval/
#
# Sets (JSONL, one item a line: {"vars": {NAME: VALUE}, "expect": LABEL}):
#   dpkg-action.jsonl        var `line`:    a /var/log/dpkg.log line whose action word
#                                           (install|upgrade|remove) is replaced by `___`
#   services-protocol.jsonl  var `entry`:   an /etc/services entry as `name port/___ …`;
#                                           expect tcp|udp
#   deb-section.jsonl        var `package`: "Package: NAME\nDescription: SYNOPSIS" from
#                                           /var/lib/dpkg/status; expect yes if Section is libs
#
# Deterministic: items are deduplicated, each class keeps at most CAP items (default 100) chosen
# by the SHA-256 of their text, and the set is ordered by the SHA-256 of each item (classes
# interleave). The same input files give byte-identical sets. Prints each set's class counts
# and majority-class baseline as a Markdown table (the one in README.md). Sources can be
# overridden: DPKG_LOGS (space-separated), SERVICES, DPKG_STATUS, CAP. Needs bash and python3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
mkdir -p "$out"
logs=${DPKG_LOGS:-}
if [ -z "$logs" ]; then
  for f in /var/log/dpkg.log.1 /var/log/dpkg.log; do [ -f "$f" ] && logs="$logs $f"; done
fi
[ -n "$logs" ] || { echo "error: no /var/log/dpkg.log (set DPKG_LOGS)" >&2; exit 2; }
services=${SERVICES:-/etc/services}
[ -f "$services" ] || { echo "error: $services is missing (Debian package netbase; scripts/setup.sh installs it)" >&2; exit 2; }
status=${DPKG_STATUS:-/var/lib/dpkg/status}
[ -f "$status" ] || { echo "error: $status is missing" >&2; exit 2; }

python3 - "$out" "${CAP:-100}" "$services" "$status" $logs <<'PY'
import collections, hashlib, json, os, re, sys

out, cap, services, status, logs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]


def h(s):
    return hashlib.sha256(s.encode()).hexdigest()


def build(name, var, items, note):
    """items: (text, label) pairs. Dedupe; drop texts seen with two labels; cap each class."""
    labels = collections.defaultdict(set)
    for text, label in items:
        labels[text].add(label)
    conflicting = sorted(t for t, ls in labels.items() if len(ls) > 1)
    by_class = collections.defaultdict(list)
    for text, ls in labels.items():
        if len(ls) == 1:
            by_class[next(iter(ls))].append(text)
    available = {c: len(ts) for c, ts in by_class.items()}
    chosen = []
    for c, ts in by_class.items():
        chosen += [(t, c) for t in sorted(ts, key=h)[:cap]]
    chosen.sort(key=lambda tc: h(tc[1] + "\n" + tc[0]))
    with open(os.path.join(out, name), "w") as f:
        for text, label in chosen:
            f.write(json.dumps({"vars": {var: text}, "expect": label}, ensure_ascii=False) + "\n")
    counts = collections.Counter(label for _, label in chosen)
    major, top = counts.most_common(1)[0]
    return {
        "name": name, "items": len(chosen), "counts": counts, "available": available,
        "majority": major, "baseline": top / len(chosen), "conflicting": len(conflicting), "note": note,
    }


sets = []

# a. dpkg.log: `DATE TIME ACTION PKG OLD NEW`. install/upgrade/remove only: the versions tell
# them apart (install: OLD is <none>; remove: NEW is <none>; upgrade: both set). purge,
# configure and trigproc lines have the same shape as remove, so the masked line could not say.
items = []
for log in logs:
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            fs = line.split()
            if len(fs) == 6 and fs[2] in ("install", "upgrade", "remove"):
                items.append((" ".join(fs[:2] + ["___"] + fs[3:]), fs[2]))
sets.append(build("dpkg-action.jsonl", "line", items, "action of " + ", ".join(logs)))

# b. /etc/services: `name port/proto [aliases…] [# comment]`, tcp or udp. Only (name, port)
# pairs listed under ONE protocol: most well-known services are listed twice (53/tcp and
# 53/udp) and their masked entries would have both answers.
entries = []
with open(services, encoding="utf-8", errors="replace") as f:
    for line in f:
        body = line.split("#", 1)[0].split()
        if len(body) < 2 or "/" not in body[1]:
            continue
        port, proto = body[1].split("/", 1)
        if proto in ("tcp", "udp"):
            entries.append((body[0], port, proto, " ".join(line.split())))
protos = collections.defaultdict(set)
for n, p, proto, _ in entries:
    protos[(n, p)].add(proto)
items = [
    (re.sub(r"^(\S+ \d+)/(tcp|udp)\b", r"\1/___", text), proto)
    for n, p, proto, text in entries
    if len(protos[(n, p)]) == 1
]
sets.append(build("services-protocol.jsonl", "entry", items,
                  f"{services}, names listed under one protocol only"))

# d. /var/lib/dpkg/status: is the package in Section libs? (Package + the Description's first
# line, the synopsis; Section and everything else hidden.)
items = []
with open(status, encoding="utf-8", errors="replace") as f:
    for para in f.read().split("\n\n"):
        d = {}
        for l in para.split("\n"):
            m = re.match(r"^([A-Za-z0-9-]+):\s?(.*)$", l)
            if m:
                d[m.group(1)] = m.group(2).strip()
        if "Package" in d and "Section" in d and d.get("Description"):
            text = f"Package: {d['Package']}\nDescription: {d['Description']}"
            items.append((text, "yes" if d["Section"] == "libs" else "no"))
sets.append(build("deb-section.jsonl", "package", items, f"Section of {status} entries"))

print("| set | items | classes (items; available) | majority class | majority baseline |")
print("|---|---:|---|---|---:|")
for s in sets:
    classes = ", ".join(f"{c} {n} ({s['available'][c]})" for c, n in sorted(s["counts"].items(), key=lambda x: (-x[1], x[0])))
    print(f"| `{s['name']}` | {s['items']} | {classes} | {s['majority']} | {s['baseline']:.3f} |")
for s in sets:
    if s["conflicting"]:
        print(f"\n{s['name']}: {s['conflicting']} texts with two labels dropped", file=sys.stderr)
PY
