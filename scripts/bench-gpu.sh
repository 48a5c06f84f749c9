#!/usr/bin/env bash
# GPU figures for the llama.cpp the follower links, on an NVIDIA machine that may have no Rust
# toolchain, no network and no room for the model file (a lent benchmark machine).
#
#   scripts/bench-gpu.sh pack DIR [MODEL]   here: DIR gets the source, a synthetic model, this script
#   DIR/bench-gpu.sh run [MODEL]            there (needs nvcc, cmake, a C++ compiler): build, bench
#
# pack: the llama.cpp source that llama-cpp-sys-2 0.1.161 vendors (as `--features cuda`
# builds it; other GPU backends left out), plus the llama-bench and llama-batched-bench sources
# from the llama-cpp-python 0.3.36 sdist (the crate leaves the tools out; see
# scripts/bench-infer.sh), as llama-src.tar.xz (~3 MB); and MODEL (default the SmolLM2 test
# model) turned by scripts/synthetic-model.py into model.gguf.gz: its real header and tensor
# layout with synthetic weights (~1 MB instead of 98 MB; same speed, nonsense answers).
# run: builds both tools with GGML_CUDA=ON for CUDA_ARCH (default 90, Hopper), OpenMP off as
# the follower builds llama.cpp, then: llama-bench pp512/tg128 at ngl 0 and 99, and
# llama-batched-bench with the foreach-item shape of #21 (221-token prompts, 8 generated
# tokens, 1–128 parallel sequences; prompts shared and separate), on the GPU and on the CPU.
# Figures go into docs/benchmarks.md by hand.
set -uo pipefail
mode=${1:-}
case "$mode" in
pack)
  dir=${2:?usage: scripts/bench-gpu.sh pack DIR [MODEL]}
  cd "$(dirname "$0")/.."
  model=${3:-$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf}
  vendored=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp | head -n1)
  [ -d "$vendored" ] || { echo "the llama-cpp-sys-2 0.1.161 source is not in the cargo registry: run cargo build first" >&2; exit 1; }
  mkdir -p "$dir" && w=$(mktemp -d) && trap 'rm -rf "$w"' EXIT
  python3 -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$w" || exit 1
  cp -r "$vendored" "$w/src" && chmod -R u+w "$w/src"
  tar -xzf "$w/llama_cpp_python-0.3.36.tar.gz" -C "$w" \
    llama_cpp_python-0.3.36/vendor/llama.cpp/tools/llama-bench llama_cpp_python-0.3.36/vendor/llama.cpp/tools/batched-bench
  for t in llama-bench batched-bench; do
    cp "$w"/llama_cpp_python-0.3.36/vendor/llama.cpp/tools/$t/{CMakeLists.txt,*.cpp} "$w/src/tools/$t/"
    echo "add_subdirectory(tools/$t)" >> "$w/src/CMakeLists.txt"
  done
  rm -rf "$w"/src/ggml/src/ggml-{sycl,vulkan,opencl,hexagon,metal,et} "$w/src/docs" "$w/src/tools/ui"
  tar -C "$w" -cJf "$dir/llama-src.tar.xz" src
  python3 scripts/synthetic-model.py "$model" "$w/model.gguf" && gzip -9c "$w/model.gguf" > "$dir/model.gguf.gz" || exit 1
  cp "$0" "$dir/bench-gpu.sh"
  du -sh "$dir"/*
  ;;
run)
  cd "$(dirname "$0")"
  date -u; nproc
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  nvcc --version | tail -2; cmake --version | head -1
  t0=$(date +%s)
  if [ ! -x build/bin/llama-batched-bench ]; then
    tar -xJf llama-src.tar.xz || exit 1
    G=""; command -v ninja >/dev/null && G="-G Ninja"
    cmake -S src -B build $G -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \
      -DGGML_F16C=ON -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_APP=OFF > cmake.log 2>&1 || { tail -30 cmake.log; exit 1; }
    cmake --build build --target llama-bench llama-batched-bench -j "$(nproc)" > build.log 2>&1 || { tail -40 build.log; exit 1; }
    echo "build: $(( $(date +%s) - t0 )) s"
  fi
  M=${2:-}
  if [ -z "$M" ]; then gunzip -kf model.gguf.gz || exit 1; M=$PWD/model.gguf; fi
  B=build/bin
  shape=(-c 65536 -b 4096 -ub 512 -npp 221 -ntg 8)
  echo "== llama-bench: ngl 0 (weights on the CPU; big prompt batches still go to the GPU) vs ngl 99"
  timeout 120 $B/llama-bench -m "$M" -t "$(nproc)" -ngl 0,99 -p 512 -n 128 -r 5 -o md
  echo "== batched-bench GPU, shared prompt (-pps)"
  timeout 90 $B/llama-batched-bench -m "$M" -ngl 99 "${shape[@]}" -npl 1,8,32,128 -pps 2>&1 | grep -E '^\|'
  echo "== batched-bench GPU, separate prompts"
  timeout 90 $B/llama-batched-bench -m "$M" -ngl 99 "${shape[@]}" -npl 1,8,32,128 2>&1 | grep -E '^\|'
  echo "== batched-bench CPU ($(nproc) threads), shared prompt"
  timeout 120 $B/llama-batched-bench -m "$M" -ngl 0 -t "$(nproc)" "${shape[@]}" -npl 1,8,32 -pps 2>&1 | grep -E '^\|'
  echo "total: $(( $(date +%s) - t0 )) s"
  ;;
*) echo "usage: scripts/bench-gpu.sh pack DIR [MODEL] | DIR/bench-gpu.sh run [MODEL]" >&2; exit 2 ;;
esac
