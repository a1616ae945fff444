"""Eval speed: images/s of the whole inference pipeline, and the metrics timed separately.

`evaluate.predict_dataset` as `genclip-jax eval` runs it (PIL decode + resize, frozen forward,
patch maps, upsampling, gaussian blur, gather to the host) with random weights at a real CLIP
shape (default ViT-L/14@336px at 518) over a one-class synthetic set; one untimed batch first
compiles everything. Then `evaluate.class_rows` (all metrics of the config) on the maps. One JSON
line.

    python benchmarks/eval.py --batch-size 1 --images 4        # CPU: ~12 s per image at ViT-L
    python benchmarks/eval.py --arch ViT-B/16 --image-size 224 --batch-size 8 --images 64
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import real_shape

from genclip_jax import evaluate
from genclip_jax.clip.model import ARCHITECTURES
from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline
from genclip_jax.methods import create_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_shape.add_arguments(parser, batch_size=8)
    args = parser.parse_args()
    config = real_shape.config(args)
    root = config.data.test_root
    entries = meta_lib.split_entries(meta_lib.read_meta(pathlib.Path(root) / "meta.json"), "test")
    dataset = pipeline.Dataset.from_entries(root, entries)
    start = time.perf_counter()
    params = create_method(config, ARCHITECTURES[args.arch]).init(jax.random.PRNGKey(0))
    model = evaluate.load_model(config, "", params)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate.predict_dataset(config, model, pipeline.Dataset.from_entries(
        root, entries[: args.batch_size]))
    first_batch_s = time.perf_counter() - start
    start = time.perf_counter()
    results = evaluate.predict_dataset(config, model, dataset)
    predict_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate.class_rows(entries, results, config)
    metrics_s = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "eval", "arch": args.arch, "image_size": args.image_size,
        "batch": args.batch_size, "images": len(dataset), "dtype": args.dtype,
        "device": jax.devices()[0].device_kind, "load_s": round(load_s, 3),
        "first_batch_s": round(first_batch_s, 3), "predict_s": round(predict_s, 3),
        "images_per_s": round(len(dataset) / predict_s, 4), "metrics_s": round(metrics_s, 3),
        "metrics": list(config.eval.metrics),
    }), flush=True)


if __name__ == "__main__":
    main()
