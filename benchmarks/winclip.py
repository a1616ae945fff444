"""WinCLIP speed: images/s of zero-shot and WinCLIP+ (k references) inference.

Random weights at open_clip's ViT-B-16-plus-240 (240 px, 15x15 patches, windows of 2x2 and 3x3
patches: 196 + 169 extra sequences of 5 and 10 tokens per image). One JSON line per (mode, batch
size); the class's text embeddings (231 prompts) and the k references' memory are computed once
beforehand, as `eval` does per class, and timed apart. Example:
  python benchmarks/winclip.py --batch-sizes 1,8 --k 4

FLOPs per image (matmuls only, 2 per multiply-add; width C, L layers, D output dim, patch p):
  patch embedding        2 N' (3 p^2) C                 (N' = 225 patches)
  a sequence of T tokens L (24 T C^2 + 4 T^2 C) + 2 C D  (the image: T = 226; each window 1 + s^2)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from genclip_jax import defaults, evaluate, steps
from genclip_jax.backbone import load_backbone
from genclip_jax.methods import create_method
from genclip_jax.methods import winclip as wc


def forward_flops(clip, windows) -> float:
    """Matmul FLOPs of one image: the full sequence plus every window sequence."""
    p, c, d, layers = clip.vision_patch_size, clip.vision_width, clip.embed_dim, clip.vision_layers
    patches = (clip.image_resolution // p) ** 2

    def sequence(t: int) -> float:
        return layers * (24 * t * c * c + 4 * t * t * c) + 2 * c * d

    flops = 2 * patches * 3 * p * p * c + sequence(patches + 1)
    flops += sum(len(w) * sequence(1 + w.shape[1]) for w in windows)
    return float(flops)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call s, mean s of `repeats` further calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return first, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--k", type=int, default=4, help="references of WinCLIP+ (0: skip it)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compute-dtype", default="float32")
    args = parser.parse_args()

    config = defaults.winclip_config()
    config.model.clip = "random"  # model.architecture = ViT-B-16-plus-240 at full size
    config.model.compute_dtype = args.compute_dtype
    clip_config, params = load_backbone(config.model)
    method = create_method(config, clip_config)
    size = config.model.image_size
    start = time.perf_counter()
    text = method.class_inputs(params, "bottle").text  # compiled and run once, as eval does
    text_first = time.perf_counter() - start
    rng = np.random.default_rng(0)
    base = {"benchmark": "winclip", "arch": config.model.architecture, "image_size": size,
            "dtype": args.compute_dtype, "device": jax.devices()[0].device_kind,
            "gflops_per_image": round(forward_flops(clip_config, method.windows) / 1e9, 1),
            "text_s": round(text_first, 3)}

    memory, memory_s = None, None
    if args.k:
        refs = rng.standard_normal((args.k, size, size, 3)).astype(np.float32)
        start = time.perf_counter()
        feats = jax.device_get(steps.encode_images(method, params, refs))
        memory = wc.memory_bank(feats, method.windows)
        memory_s = time.perf_counter() - start

    for k in ([0, args.k] if args.k else [0]):
        config.fewshot.k = k  # a method of another config: compiled apart
        predict = evaluate.make_predict_fn(create_method(config, clip_config))
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            images = jnp.asarray(rng.standard_normal((batch_size, size, size, 3)), jnp.float32)
            batch = {"text": np.broadcast_to(text, (batch_size, *text.shape))}
            if k:
                batch.update({f"memory_{key}": np.broadcast_to(v, (batch_size, *v.shape))
                              for key, v in memory.items()})
            batch = jax.tree.map(jnp.asarray, batch)
            first, step = timed(lambda b=batch, x=images, f=predict: f({}, params, x, b),
                                args.repeats)
            print(json.dumps({
                **base, "mode": f"{k}-shot" if k else "zero-shot", "k": k, "batch": batch_size,
                "first_call_s": round(first, 3), "step_s": round(step, 4),
                "images_per_s": round(batch_size / step, 4),
                "memory_s": round(memory_s, 3) if k else None,
            }), flush=True)


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
