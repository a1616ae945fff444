"""Plain matmul GFLOP/s in fp32 and bf16: what a CPU's XLA (and torch, where importable) reach.

The shape is ViT-L's MLP at 518 (1370 x 1024 @ 1024 x 4096). One JSON line per (library, dtype):
  python benchmarks/matmul.py            # add --torch-python PY to time torch in that Python
Why: bf16 pays only where the backend has a bf16 matmul (AMX via oneDNN in torch); XLA's CPU
matmul does not use it, so `compute_dtype=bfloat16` is no CPU speed-up (README, Benchmarks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

import jax
import jax.numpy as jnp

M, K, N = 1370, 1024, 4096

TORCH = """
import json, time, torch
for dtype in (torch.float32, torch.bfloat16):
    a, b = torch.randn(%d, %d, dtype=dtype), torch.randn(%d, %d, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(%d):
        t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
    gflops = round(2 * %d * %d * %d / best / 1e9, 1)
    print(json.dumps({"benchmark": "matmul", "library": "torch " + torch.__version__,
                      "dtype": str(dtype).split(".")[1], "gflops": gflops}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--torch-python", default=None, help="a Python with torch installed")
    args = parser.parse_args()
    for dtype in (jnp.float32, jnp.bfloat16):
        a = jnp.ones((M, K), dtype)
        b = jnp.ones((K, N), dtype)
        matmul = jax.jit(jnp.matmul)
        jax.block_until_ready(matmul(a, b))
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(matmul(a, b))
            best = min(best, time.perf_counter() - start)
        print(json.dumps({"benchmark": "matmul", "library": f"jax {jax.__version__}",
                          "dtype": jnp.dtype(dtype).name,
                          "gflops": round(2 * M * K * N / best / 1e9, 1)}), flush=True)
    if args.torch_python:
        code = TORCH % (M, K, K, N, args.repeats, M, K, N)
        print(subprocess.run([args.torch_python, "-c", code], check=True, capture_output=True,
                             text=True).stdout, end="")


if __name__ == "__main__":
    main()
