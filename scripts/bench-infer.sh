#!/usr/bin/env bash
# `follower models bench` against llama.cpp's own `llama-bench`, side by side (interleaved
# rounds, alternating which goes first), same model, same threads, same tests (pp512, tg128).
#
#   scripts/bench-infer.sh [ROUNDS] [THREADS]     (defaults 5 and the physical cores)
#   MODEL=path/to.gguf scripts/bench-infer.sh     (default: the SmolLM2 test model)
#
# llama-bench is built from the llama.cpp source that llama-cpp-sys-2 vendors (in the cargo
# registry), with the options its build script uses (Release, GGML_NATIVE=OFF, no OpenMP,
# static). That crate leaves the tools' sources out, so the three llama-bench files
# (tools/llama-bench/{CMakeLists.txt,llama-bench.cpp,main.cpp}) come from the llama.cpp that
# the PyPI sdist of llama-cpp-python 0.3.36 vendors (ggml 0.25.3 against the crate's 0.26.0;
# the benchmark code compiles against the newer library unchanged). Prints each round and the
# medians; figures go into docs/benchmarks.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
model=${MODEL:-$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$model" ] || model=$(models/fetch.sh)
cargo build --release --locked -p follower >/dev/null
F=$PWD/target/release/follower
threads=${2:-$("$F" telemetry --json | python3 -c 'import sys, json; print(json.load(sys.stdin)["cpus"])')}

out=$PWD/target/llama-bench
if [ ! -x "$out/build/bin/llama-bench" ]; then
  vendored=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-0.1.161/llama.cpp | head -n1)
  [ -d "$vendored" ] || { echo "the llama-cpp-sys-2 0.1.161 source is not in the cargo registry: run cargo build first" >&2; exit 1; }
  mkdir -p "$out"
  rm -rf "$out/src" && cp -r "$vendored" "$out/src" && chmod -R u+w "$out/src"
  if [ ! -f "$out/llama_cpp_python-0.3.36.tar.gz" ]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$out"
  fi
  tar -xzf "$out/llama_cpp_python-0.3.36.tar.gz" -C "$out" \
    llama_cpp_python-0.3.36/vendor/llama.cpp/tools/llama-bench
  cp "$out"/llama_cpp_python-0.3.36/vendor/llama.cpp/tools/llama-bench/{CMakeLists.txt,llama-bench.cpp,main.cpp} \
    "$out/src/tools/llama-bench/"
  echo 'add_subdirectory(tools/llama-bench)' >> "$out/src/CMakeLists.txt"
  cmake -S "$out/src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DGGML_OPENMP=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_APP=OFF >/dev/null
  cmake --build "$out/build" --target llama-bench -j "$(nproc)" >/dev/null
fi
B=$out/build/bin/llama-bench

w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
echo "model $model, $threads threads, $rounds rounds (each: llama-bench -r 5, follower models bench -r 5)"
lb() { "$B" -m "$model" -t "$threads" -p 512 -n 128 -r 5 -o json > "$w/lb-$1.json" 2>/dev/null; }
fb() { "$F" --state-dir "$w/state" models bench --model "$model" --threads "$threads" -p 512 -n 128 -r 5 --json > "$w/fb-$1.json"; }
for r in $(seq 1 "$rounds"); do
  # Alternate which goes first, so that a trend in the machine's speed favours neither.
  if [ $((r % 2)) -eq 1 ]; then lb "$r"; fb "$r"; else fb "$r"; lb "$r"; fi
done
python3 - "$w" "$rounds" <<'PY'
import json, statistics, sys
w, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(1, rounds + 1):
    lb = json.load(open(f"{w}/lb-{r}.json"))
    lpp = next(t["avg_ts"] for t in lb if t["n_prompt"] > 0 and t["n_gen"] == 0)
    ltg = next(t["avg_ts"] for t in lb if t["n_gen"] > 0 and t["n_prompt"] == 0)
    fb = json.load(open(f"{w}/fb-{r}.json"))
    fpp = statistics.mean(fb["prompt_tokens_per_sec"])
    ftg = statistics.mean(fb["generation_tokens_per_sec"])
    rows.append((lpp, fpp, ltg, ftg))
    print(f"round {r}: pp512 llama-bench {lpp:8.1f} follower {fpp:8.1f} ({fpp/lpp:.3f}x)   "
          f"tg128 llama-bench {ltg:7.1f} follower {ftg:7.1f} ({ftg/ltg:.3f}x)")
med = lambda i: statistics.median(r[i] for r in rows)
ratio = lambda a, b: statistics.median(r[b] / r[a] for r in rows)
print(f"median pp512: llama-bench {med(0):.1f} t/s, follower {med(1):.1f} t/s, ratio {ratio(0, 1):.3f}x")
print(f"median tg128: llama-bench {med(2):.1f} t/s, follower {med(3):.1f} t/s, ratio {ratio(2, 3):.3f}x")
PY
