#!/usr/bin/env python3
"""Write a GGUF model with a real model's header and synthetic weights.

    python3 scripts/synthetic-model.py SOURCE.gguf OUT.gguf

The output keeps SOURCE's metadata (architecture, hyperparameters, tokenizer) and tensor
directory byte for byte, and fills each tensor with valid, highly compressible values of its
own ggml type: F32 norms 1.0 and other F32 0.01; Q4_1 blocks (scale 0.02, min -0.15) and
Q8_0 blocks (scale 0.01) with quants from a fixed pseudo-random pattern. Inference speed
depends on the shapes and types, not on the values, so the file measures throughput like the
real one (scripts/bench-gpu.sh checks this against the real model on the CPU) while gzip
shrinks it ~100x — for a benchmark machine that the real file cannot reach. Its answers are
nonsense: never use it for quality figures.

Needs the `gguf` Python package (pip install gguf) and numpy. Exits 1 on a tensor type it
does not know (say which).
"""
import shutil
import sys

import gguf
import numpy as np


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src, dst = sys.argv[1], sys.argv[2]
    reader = gguf.GGUFReader(src)
    pattern = np.random.default_rng(7).integers(0, 256, size=16 * 97, dtype=np.uint8)
    f16 = lambda v: np.frombuffer(np.float16(v).tobytes(), np.uint8)  # noqa: E731
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as out:
        for t in reader.tensors:
            n, kind = int(t.n_bytes), t.tensor_type.name
            out.seek(int(t.data_offset))
            if kind == "F32":
                out.write(np.full(n // 4, 1.0 if "norm" in t.name else 0.01, np.float32).tobytes())
            elif kind == "Q4_1":  # d: f16, m: f16, 16 bytes of 4-bit quants (32 weights)
                blocks = np.zeros((n // 20, 20), np.uint8)
                blocks[:, 0:2], blocks[:, 2:4] = f16(0.02), f16(-0.15)
                blocks[:, 4:] = np.resize(pattern, (n // 20, 16))
                out.write(blocks.tobytes())
            elif kind == "Q8_0":  # d: f16, 32 int8 quants
                blocks = np.zeros((n // 34, 34), np.uint8)
                blocks[:, 0:2] = f16(0.01)
                blocks[:, 2:] = np.resize(pattern, (n // 34, 32))
                out.write(blocks.tobytes())
            else:
                print(f"{src}: tensor {t.name}: type {kind} is not one this script synthesises "
                      "(F32, Q4_1, Q8_0)", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
