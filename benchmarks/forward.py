"""Vision forward speed: images/s, peak memory and MFU of the DPAM forward with taps 6/12/18/24.

Random weights at a real CLIP shape (default ViT-L/14@336px run at 518). One JSON line per
(batch size, dtype). Example:
  python benchmarks/forward.py --batch-sizes 1 --dtypes float32,bfloat16

FLOPs per image (matmuls only, 2 per multiply-add), N tokens, width C, L layers, D = output dim:
  patch embedding 2 N' (3 p^2) C  (N' = N - 1 patches)
  every block     24 N C^2 + 4 N^2 C          (qkv 6NC^2, out 2NC^2, MLP 16NC^2, QK^T and AV)
  DPAM blocks     + 2 N C^2 + 4 N^2 C         (V-V scores, AV and the shared out projection)
  taps            2 N C D each                (ln_post @ proj), + 2 C D for the global feature
MFU = FLOPs per image x images/s / peak FLOP/s (`--peak-tflops`, e.g. 989 for H100 bf16 dense).
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


def forward_flops(config, image_size: int, n_taps: int) -> float:
    """Matmul FLOPs of one image's DPAM vision forward (formula in the module docstring)."""
    p, c, d = config.vision_patch_size, config.vision_width, config.embed_dim
    patches = (image_size // p) ** 2
    n = patches + 1
    dpam_blocks = 0 if not config.dpam_start else config.vision_layers - config.dpam_start + 1
    flops = 2 * patches * 3 * p * p * c
    flops += config.vision_layers * (24 * n * c * c + 4 * n * n * c)
    flops += dpam_blocks * (2 * n * c * c + 4 * n * n * c)
    return float(flops + n_taps * 2 * n * c * d + 2 * c * d)


def measure(arch: str, image_size: int, batch: int, dtype: str, taps, repeats: int,
            peak_tflops: float | None) -> dict:
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
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(params, images))
        times.append(time.perf_counter() - start)
    step_s = sum(times) / repeats
    flops = forward_flops(config, image_size, len(taps))
    achieved = flops * batch / step_s
    return {
        "benchmark": "vision_forward", "arch": arch, "image_size": image_size, "batch": batch,
        "dtype": dtype, "taps": list(taps), "device": jax.devices()[0].device_kind,
        "first_call_s": round(compile_s, 3), "step_s": round(step_s, 4),
        "step_min_s": round(min(times), 4), "images_per_s": round(batch / step_s, 3),
        "peak_memory_bytes": peak_memory_bytes(),
        "gflops_per_image": round(flops / 1e9, 2), "achieved_tflops": round(achieved / 1e12, 4),
        "mfu": round(achieved / (peak_tflops * 1e12), 4) if peak_tflops else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-L/14@336px", choices=sorted(ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--taps", default="6,12,18,24")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak for the MFU (e.g. 989 for H100 bf16 dense)")
    args = parser.parse_args()
    taps = tuple(int(t) for t in args.taps.split(","))
    for dtype in args.dtypes.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            print(json.dumps(measure(args.arch, args.image_size, batch, dtype, taps,
                                     args.repeats, args.peak_tflops)), flush=True)


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
