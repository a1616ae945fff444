"""Vision forward speed: images/s and peak memory of the DPAM forward with taps 6/12/18/24.

Random weights at a real CLIP shape (default ViT-L/14@336px run at 518). One JSON line per
(batch size, dtype). Example:
  python benchmarks/forward.py --batch-sizes 1 --dtypes float32,bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp

from genclip_jax.clip.model import ARCHITECTURES, CLIP, init_params


def peak_memory_bytes() -> int:
    """Device peak where the backend reports it (GPU/TPU), else the process's max RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(arch: str, image_size: int, batch: int, dtype: str, taps, repeats: int) -> dict:
    config = ARCHITECTURES[arch].replace(dpam_start=6, compute_dtype=dtype)
    params = init_params(config)
    model = CLIP(config)
    forward = jax.jit(
        lambda p, x: model.apply({"params": p}, x, taps, method=CLIP.encode_image)
    )
    images = jax.random.normal(jax.random.PRNGKey(1), (batch, image_size, image_size, 3))
    start = time.perf_counter()
    jax.block_until_ready(forward(params, images))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        out = forward(params, images)
    jax.block_until_ready(out)
    step_s = (time.perf_counter() - start) / repeats
    return {
        "benchmark": "vision_forward", "arch": arch, "image_size": image_size, "batch": batch,
        "dtype": dtype, "taps": list(taps), "device": jax.devices()[0].device_kind,
        "first_call_s": round(compile_s, 3), "step_s": round(step_s, 4),
        "images_per_s": round(batch / step_s, 3), "peak_memory_bytes": peak_memory_bytes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-L/14@336px", choices=sorted(ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--taps", default="6,12,18,24")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    taps = tuple(int(t) for t in args.taps.split(","))
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            print(json.dumps(measure(args.arch, args.image_size, batch, dtype, taps,
                                     args.repeats)), flush=True)


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
