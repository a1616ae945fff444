"""GenCLIP speed: train steps/s, eval images/s and the per-image text-encoder cost.

Random weights at a real CLIP shape (default ViT-L/14@336px run at 518, DPAM from block 6, the
default GenCLIP config). Uses the production jitted pieces (`train.make_encode_fn`,
`train.make_update_fn`, `evaluate.make_predict_fn`); `branch_text` (B*L*2 + 2 text sequences:
the vision-enhanced prompts of every image and layer, and the query-only pair) is also timed
alone. One JSON line per measurement. Example:
  python benchmarks/genclip.py --batch-size 8
  python benchmarks/genclip.py --arch ViT-B/16 --image-size 224 --batch-size 2 --layers 3,6,9,12
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from forward import peak_memory_bytes

from genclip_jax import defaults, evaluate, train
from genclip_jax.clip.model import ARCHITECTURES, init_params
from genclip_jax.methods.genclip import GenCLIP


def timed(step: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call incl. compile, mean later call) in seconds; `step` returns device arrays."""
    start = time.perf_counter()
    jax.block_until_ready(step())
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        out = step()
    jax.block_until_ready(out)
    return first, (time.perf_counter() - start) / repeats


def measure(args: argparse.Namespace) -> list[dict]:
    clip_config = ARCHITECTURES[args.arch].replace(dpam_start=6, compute_dtype=args.dtype)
    config = defaults.base_config()
    config.method = "genclip"
    config.model.image_size = args.image_size
    config.genclip.layers = [int(x) for x in args.layers.split(",")]
    method = GenCLIP(config, clip_config)
    clip_params = init_params(clip_config)
    b, size = args.batch_size, args.image_size
    images = jax.random.normal(jax.random.PRNGKey(1), (b, size, size, 3))
    host = {"cls_name": ["bottle"] * b}
    batch = {"mask": jnp.zeros((b, size, size)), "label": jnp.zeros((b,), jnp.int32),
             "valid": jnp.ones((b,), bool), **method.host_inputs(host)}
    tx = train.make_optimizer(config.train)
    state = train.create_train_state(method, tx, seed=0)
    encode, update = train.make_encode_fn(method), train.make_update_fn(method, tx)
    predict = evaluate.make_predict_fn(method)
    feats = jax.block_until_ready(encode(clip_params, images))
    text = jax.jit(method.branch_text)

    def train_step():
        nonlocal state
        state, metrics = update(state, clip_params, encode(clip_params, images), batch)
        return metrics

    def cached_step():  # train.cache_features: the vision forward is skipped
        nonlocal state
        state, metrics = update(state, clip_params, feats, batch)
        return metrics

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    common = {
        "arch": args.arch, "image_size": size, "batch": b, "dtype": args.dtype,
        "layers": list(config.genclip.layers), "gqp_len": config.genclip.gqp_len,
        "state_len": config.genclip.state_len, "trainable_params": n_params,
        "device": jax.devices()[0].device_kind,
    }
    rows = []
    for name, step, unit in (
        ("train_step", train_step, "steps"),
        ("train_step_cached_features", cached_step, "steps"),
        ("eval", lambda: predict(state.params, clip_params, images, batch), "images"),
        ("branch_text", lambda: text(state.params, clip_params, feats, batch["prompt_ids"]),
         "images"),
    ):
        first, step_s = timed(step, args.repeats)
        row = {"benchmark": f"genclip_{name}", **common, "first_call_s": round(first, 3),
               "step_s": round(step_s, 4)}
        row[f"{unit}_per_s"] = round((1 if unit == "steps" else b) / step_s, 3)
        if name == "branch_text":
            row["text_sequences"] = b * len(config.genclip.layers) * 2 + 2
            row["text_s_per_image"] = round(step_s / b, 4)
        row["peak_memory_bytes"] = peak_memory_bytes()
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-L/14@336px", choices=sorted(ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", default="6,12,18,24")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=3)
    for row in measure(parser.parse_args()):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()
