#!/usr/bin/env bash
# Fresh-machine check: proves the README's "Two commands" (scripts/demo.sh, then scripts/test.sh)
# pass on a Debian 12 machine that has nothing but what the README names.
#
#   scripts/fresh-check.sh [--keep-root] [--no-cache] [ROOT]      (as root on a Debian host)
#
# 1. debootstraps a fresh Debian 12 (bookworm, variant minbase) into ROOT (default
#    /var/tmp/tracefleet-fresh), removing whatever a previous run left there (--keep-root
#    reuses that root instead). The downloaded packages are cached in a debootstrap tarball
#    next to ROOT (--no-cache: download again);
# 2. installs in it only git, ca-certificates, curl — and libclang-cpp14, on purpose: a real
#    fresh Debian 12 image carried that library without libclang.so, which once fooled
#    scripts/setup.sh. Nothing else: setup.sh must install cmake, libclang-dev, g++,
#    python3-pip, mosquitto, openssl itself. Then rustup, exactly as https://rustup.rs says;
# 3. `git clone`s this repository's committed HEAD (not the working tree) to /root/tracefleet;
# 4. runs there, as root, in a chroot inside a private mount and PID namespace (network
#    shared with the host; /proc, /sys, /dev, /dev/pts, /dev/shm and a tmpfs /tmp mounted
#    only in that namespace, so they vanish with it): scripts/demo.sh, then scripts/test.sh,
#    each timed, each logged in full to ROOT.logs/ on the host;
# 5. prints a summary (also in ROOT.logs/summary.txt) and exits non-zero unless both passed.
#
# Takes about 30 minutes on 2 cores, up to 60 when other builds share them (measured: 27 min =
# root, packages and rustup 1–3 min, demo.sh 14 min with its release build of llama.cpp,
# test.sh 12 min with the debug build). Needs root, debootstrap, unshare (util-linux) and git
# on the host, and network access to deb.debian.org, static.rust-lang.org, crates.io and PyPI;
# the host's resolv.conf and local CA certificates are copied in, so a TLS-inspecting egress
# proxy works in the root as on the host. Safe to rerun; one run at a time.
set -euo pipefail

usage() { sed -n '2,/^set -euo pipefail/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; }
keep_root=0 use_cache=1 root=
while [ $# -gt 0 ]; do
  case $1 in
  --keep-root) keep_root=1 ;;
  --no-cache) use_cache=0 ;;
  -h | --help) usage; exit 0 ;;
  -*) echo "fresh-check: unknown option $1" >&2; usage >&2; exit 2 ;;
  *) [ -z "$root" ] || { echo "fresh-check: one ROOT only" >&2; exit 2; }; root=$1 ;;
  esac
  shift
done
root=${root:-/var/tmp/tracefleet-fresh}
root=${root%/}
case $root in
/?*) ;;
*) echo "fresh-check: ROOT must be an absolute path other than / (got '$root')" >&2; exit 2 ;;
esac

src=$(cd "$(dirname "$0")/.." && pwd)
parent=$(dirname "$root")
logs=$root.logs
mirror=${TRACEFLEET_FRESH_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
base_pkgs=(git ca-certificates curl libclang-cpp14)
tarball=$parent/$(basename "$root")-$suite-minbase.debs.tgz
clone=/root/tracefleet
started=$(date +%s)

[ "$(id -u)" = 0 ] || { echo "fresh-check: run as root (debootstrap, chroot, mounts)" >&2; exit 2; }
for c in debootstrap unshare chroot git findmnt flock; do
  command -v "$c" >/dev/null || { echo "fresh-check: needs $c on the host (apt-get install debootstrap util-linux git)" >&2; exit 2; }
done
mkdir -p "$parent" "$logs"
exec 9>"$root.lock"
flock -n 9 || { echo "fresh-check: another run holds $root.lock" >&2; exit 2; }

say() { printf '[fresh-check %s +%ss] %s\n' "$(date +%T)" "$(($(date +%s) - started))" "$*"; }
# Mount points at or beneath ROOT in the host's namespace (there should be none).
mounts_under() { findmnt -rn -o TARGET | awk -v r="$root" '$0 == r || index($0, r "/") == 1'; }
cleanup() {
  local rc=$? m
  trap - EXIT INT TERM
  # The mounts live in the run's private namespace and vanish with it; this is a safety net.
  for m in $(mounts_under | sort -r); do
    echo "fresh-check: unmounting leftover $m" >&2
    umount -l "$m" || true
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# in_root LOG SCRIPT: runs SCRIPT with bash as root in the chroot, in a private mount and PID
# namespace (--kill-child: nothing it started outlives it), output appended to LOG.
in_root() {
  local log=$1 script=$2
  unshare --mount --pid --fork --kill-child --propagation private -- /bin/bash -c '
    set -e
    r=$1
    mount -t proc proc "$r/proc"
    mount --rbind /sys "$r/sys"
    mount --make-rslave "$r/sys"
    mount --bind /dev "$r/dev"
    mount --bind /dev/pts "$r/dev/pts"
    mount -t tmpfs -o mode=1777,nosuid,nodev shm "$r/dev/shm"
    mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$r/tmp"
    cd "$r"
    exec chroot "$r" /usr/bin/env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/bash \
      PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM=dumb \
      CARGO_BUILD_JOBS=2 CARGO_TERM_COLOR=never \
      /bin/bash -c "cd /root && $2"
  ' fresh-check "$root" "$script" </dev/null >>"$log" 2>&1
}
# timed VAR LOG SCRIPT: in_root, with its exit code in VAR_rc and wall seconds in VAR_secs.
timed() {
  local var=$1 t0 rc=0
  t0=$(date +%s)
  in_root "$2" "$3" || rc=$?
  printf -v "${var}_rc" %s "$rc"
  printf -v "${var}_secs" %s "$(($(date +%s) - t0))"
}
fail_tail() { echo "--- last lines of $1 (build-script noise left out):" >&2; grep -vE "cargo:rerun-if|= None$|^\s*$" "$1" | tail -n 40 >&2; }

# ---- 1. the root --------------------------------------------------------------------------
rm -f "$logs"/*.log "$logs/summary.txt"
[ -z "$(mounts_under)" ] || { echo "fresh-check: something is mounted under $root:" >&2; mounts_under >&2; exit 1; }
deboot_secs=0 deboot_note=
if [ $keep_root = 1 ] && [ -f "$root/etc/debian_version" ]; then
  say "reusing the root $root (--keep-root)"
  deboot_note="kept from a previous run (--keep-root)"
else
  if [ -e "$root" ]; then
    say "removing the previous root $root"
    rm -rf --one-file-system "$root"
  fi
  t0=$(date +%s)
  if [ $use_cache = 1 ] && [ -s "$tarball" ]; then
    deboot_note="packages from the cached tarball $tarball"
  else
    say "debootstrap: downloading $suite minbase from $mirror"
    rm -rf "$root.mk" "$tarball.part"
    debootstrap --variant=minbase --make-tarball="$tarball.part" "$suite" "$root.mk" "$mirror" \
      >>"$logs/debootstrap.log" 2>&1 || { fail_tail "$logs/debootstrap.log"; exit 1; }
    rm -rf "$root.mk"
    mv "$tarball.part" "$tarball"
    deboot_note="packages downloaded (cached in $tarball)"
  fi
  say "debootstrap: installing $suite minbase into $root"
  debootstrap --variant=minbase --unpack-tarball="$tarball" "$suite" "$root" "$mirror" \
    >>"$logs/debootstrap.log" 2>&1 || { fail_tail "$logs/debootstrap.log"; exit 1; }
  deboot_secs=$(($(date +%s) - t0))
fi
debian_version=$(cat "$root/etc/debian_version")

# What any Debian 12 machine has: its three suites, name resolution, a hosts file. No daemon
# is started by a package's install script (policy-rc.d, as in any chroot or container).
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb ${mirror%/debian}/debian-security $suite-security main
EOF
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# The host's network may need local CAs (a TLS-inspecting egress proxy): the root gets the same
# ones, so HTTPS works in it as on the host (ca-certificates, installed below, adds them).
mkdir -p "$root/usr/local/share/ca-certificates"
local_cas=0
for f in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$f" ] || continue
  cp -L "$f" "$root/usr/local/share/ca-certificates/"
  local_cas=$((local_cas + 1))
done
[ -s "$root/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"

# ---- 2. what the README names, and the libclang-cpp trap ------------------------------------
say "installing ${base_pkgs[*]} (nothing else) in the root"
timed base "$logs/base.log" "set -e
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${base_pkgs[*]}
  echo '--- the trap: libclang-cpp present, nothing bindgen loads'
  ls -l /usr/lib/*-linux-gnu/libclang-cpp.so.14* /usr/lib/llvm-14/lib/libclang-cpp.so* 2>&1 || true
  [ $keep_root = 1 ] && exit 0
  ls /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so* /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* 2>/dev/null && { echo 'unexpected: libclang.so is already present'; exit 3; }
  for c in cmake c++ g++ pip3 mosquitto cargo; do
    if command -v \$c >/dev/null; then echo \"unexpected: \$c is already installed\"; exit 4; fi
  done
  echo 'ok: none of cmake, c++, pip, mosquitto, cargo, libclang.so is present'"
[ "$base_rc" = 0 ] || { fail_tail "$logs/base.log"; echo "fresh-check: installing the base packages failed (exit $base_rc)" >&2; exit 1; }

if [ -x "$root/root/.cargo/bin/rustup" ] && [ $keep_root = 1 ]; then
  say "rustup: kept from a previous run (--keep-root)"
  rustup_rc=0 rustup_secs=0
else
  # https://rustup.rs's command; where sh.rustup.rs cannot be reached (a network that lets only
  # static.rust-lang.org through), the same script from where sh.rustup.rs serves it.
  say "rustup: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal"
  timed rustup "$logs/rustup.log" "set -eo pipefail
    if curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs >/tmp/rustup-init.sh; then
      echo 'rustup-init.sh from https://sh.rustup.rs'
    else
      echo 'sh.rustup.rs unreachable: rustup-init.sh from https://static.rust-lang.org/rustup/rustup-init.sh'
      curl --proto '=https' --tlsv1.2 -sSf https://static.rust-lang.org/rustup/rustup-init.sh >/tmp/rustup-init.sh
    fi
    sh /tmp/rustup-init.sh -y --profile minimal"
  [ "$rustup_rc" = 0 ] || { fail_tail "$logs/rustup.log"; echo "fresh-check: rustup failed (exit $rustup_rc)" >&2; exit 1; }
fi
in_root "$logs/rustup.log" '. "$HOME/.cargo/env"; echo "--- versions"; rustup --version 2>/dev/null; rustup default; rustc --version; cargo --version'
rustup_version=$(grep -E '^rustup [0-9]' "$logs/rustup.log" | tail -1)
rustup_from=$(grep -m1 -E '^(rustup-init.sh from|sh.rustup.rs unreachable)' "$logs/rustup.log" || echo "kept (--keep-root)")
toolchain=$(grep -E '^rustc [0-9]' "$logs/rustup.log" | tail -1)

# ---- 3. a clone of the committed HEAD -------------------------------------------------------
rm -rf --one-file-system "$root$clone"
git clone --quiet --no-hardlinks "$src" "$root$clone"
head=$(git -C "$root$clone" log -1 --format='%h %s' | cut -c1-100)
say "cloned $src at $head to $clone"

# ---- 4. the README's two commands -----------------------------------------------------------
run_cmd='set -e; . "$HOME/.cargo/env"; cd '"$clone"'; '
say "scripts/demo.sh (log: $logs/demo.log)"
timed demo "$logs/demo.log" "$run_cmd"'echo "+ $PWD\$ scripts/demo.sh"; scripts/demo.sh'
say "scripts/demo.sh: exit $demo_rc in ${demo_secs}s"
[ "$demo_rc" = 0 ] || fail_tail "$logs/demo.log"
say "scripts/test.sh (log: $logs/test.log)"
timed test "$logs/test.log" "$run_cmd"'echo "+ $PWD\$ scripts/test.sh"; scripts/test.sh'
say "scripts/test.sh: exit $test_rc in ${test_secs}s"
[ "$test_rc" = 0 ] || fail_tail "$logs/test.log"

# ---- 5. summary -----------------------------------------------------------------------------
read -r t_bins t_passed t_failed t_ignored < <(awk '
  /^test result:/ { n++; for (i = 1; i <= NF; i++) { v = $(i - 1) + 0
    if ($i ~ /^passed/) p += v; else if ($i ~ /^failed/) f += v; else if ($i ~ /^ignored/) g += v } }
  END { print n + 0, p + 0, f + 0, g + 0 }' "$logs/test.log")
installed=$(grep -m1 -o 'installing Debian packages: .*' "$logs/demo.log" | cut -d: -f2- || true)
result=FAIL
[ "$demo_rc" = 0 ] && [ "$test_rc" = 0 ] && [ "$t_bins" -gt 0 ] && [ "$t_failed" = 0 ] && result=PASS
{
  echo "== tracefleet fresh check: Debian $debian_version ($suite, minbase) in $root"
  echo "source:      $src, committed HEAD $head"
  echo "debootstrap: ${deboot_secs}s ($deboot_note)"
  echo "base:        ${base_secs}s: ${base_pkgs[*]} (libclang-cpp.so.14 present, no libclang.so)"
  echo "host net:    /etc/resolv.conf and $local_cas local CA certificate(s) copied in"
  echo "rustup:      ${rustup_version:-?}; toolchain ${toolchain:-?} (install ${rustup_secs}s; $rustup_from)"
  echo "setup.sh:    installed${installed:- nothing}"
  echo "demo.sh:     exit $demo_rc, ${demo_secs}s wall (log $logs/demo.log)"
  echo "test.sh:     exit $test_rc, ${test_secs}s wall (log $logs/test.log)"
  echo "tests:       $t_bins 'test result:' lines: $t_passed passed, $t_failed failed, $t_ignored ignored"
  echo "total:       $(($(date +%s) - started))s"
  echo "RESULT:      $result"
} | tee "$logs/summary.txt"
[ $result = PASS ]
