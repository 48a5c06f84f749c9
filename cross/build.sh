#!/usr/bin/env bash
# Cross-builds the follower, llama.cpp included, for a Raspberry Pi with Debian's cross
# compilers, and prints its size.
#
#   cross/build.sh [aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf]
#
# Needs (Debian 12): gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross
# (armv7: gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf libc6-dev-armhf-cross), cmake,
# libclang-dev; `rustup target add TARGET` is done here. Output:
# target/TARGET/release/follower. llama.cpp is built for the architecture's baseline
# (aarch64: armv8-a, so a Pi 4 and a Pi 5 both run it; armv7: armv7-a + NEON).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-aarch64-unknown-linux-gnu}
case $target in
  aarch64-unknown-linux-gnu) gnu=aarch64-linux-gnu; processor=aarch64
    pkgs="gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
  armv7-unknown-linux-gnueabihf) gnu=arm-linux-gnueabihf; processor=armv7l
    pkgs="gcc-arm-linux-gnueabihf g++-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
  *) echo "error: unknown target $target: expected aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf" >&2; exit 2 ;;
esac
command -v "$gnu-g++" >/dev/null || { echo "error: $gnu-g++ not found: apt-get install -y $pkgs" >&2; exit 2; }
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
t=${target//-/_}
T=$(echo "$t" | tr '[:lower:]' '[:upper:]')
export "CARGO_TARGET_${T}_LINKER=$gnu-gcc"
export "CC_$t=$gnu-gcc" "CXX_$t=$gnu-g++" "AR_$t=$gnu-ar"
export "CMAKE_TOOLCHAIN_FILE_$t=$PWD/cross/linux-gnu.cmake" \
  TRACEFLEET_CROSS_GNU=$gnu TRACEFLEET_CROSS_PROCESSOR=$processor
# bindgen parses llama.cpp's headers with the host's libclang: point it at the target's headers.
export "BINDGEN_EXTRA_CLANG_ARGS_$t=--target=$gnu --sysroot=/usr/$gnu -I/usr/$gnu/include"
cargo build --release --locked --target "$target" -p follower
F=target/$target/release/follower
"$gnu-strip" -o "$F.stripped" "$F"
echo "$F: $(stat -c %s "$F.stripped") bytes stripped ($(file -b "$F" | cut -d, -f1-2))"
