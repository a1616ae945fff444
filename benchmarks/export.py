"""The exported artifact (`genclip-jax export` + `genclip_jax.serving`) vs in-process predict.

One JSON line: export time, artifact size, load and first-call time, and images/s of the
artifact and of `genclip_jax.load(...).predict` on the same uint8 images at the same batch size
(predict also with `normalized=True`: without its host-side PIL resize and normalisation).
Random weights: the tiny backbone by default, or a published shape with --arch. Example:
  python benchmarks/export.py --method anomalyclip --batch-size 8 --images 32
  python benchmarks/export.py --arch ViT-L/14@336px --image-size 518 --batch-size 8 --images 16
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import jax
import numpy as np
import real_shape

import genclip_jax
from genclip_jax import checkpoint, defaults, export, serving
from genclip_jax.backbone import load_backbone
from genclip_jax.data import pipeline
from genclip_jax.methods import create_method, needs_training


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call s, mean s of `repeats` further calls)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return first, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="anomalyclip",
                        choices=("anomalyclip", "genclip", "winclip"))
    parser.add_argument("--arch", default="", help="a published shape (default: the tiny one)")
    parser.add_argument("--image-size", type=int, default=518, help="with --arch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.arch:
        args.dtype = "float32"
        config = real_shape.config(args)
        config.method = args.method
    else:
        config = defaults.tiny_config(args.method)
    config.eval.batch_size = args.batch_size
    config.train.progress = False
    size = config.model.image_size
    images = np.random.default_rng(0).integers(0, 256, (args.images, size, size, 3), np.uint8)
    class_name = "disc" if args.method == "genclip" else None
    with tempfile.TemporaryDirectory() as tmp:
        if needs_training(args.method):
            clip_config, _ = load_backbone(config.model)
            params = create_method(config, clip_config).init(jax.random.PRNGKey(0))
            checkpoint.save_params(pathlib.Path(tmp) / "params", params)
            config.eval.params = str(pathlib.Path(tmp) / "params")
        start = time.perf_counter()
        out = export.export(config, None, str(pathlib.Path(tmp) / "artifact"),
                            classes=[class_name] if class_name else None)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        artifact = serving.load(out)
        load_s = time.perf_counter() - start
        artifact_first, artifact_s = timed(lambda: artifact(images, class_name=class_name),
                                           args.repeats)
        weights_mb = (out / export.WEIGHTS).stat().st_size / 2**20
        model = genclip_jax.load(config.eval.params or None, config=config)
        predict_first, predict_s = timed(lambda: model.predict(images, class_name=class_name),
                                         args.repeats)
        normalized = np.stack([pipeline.normalize(x) for x in images])
        _, normalized_s = timed(
            lambda: model.predict(normalized, class_name=class_name, normalized=True),
            args.repeats)
    print(json.dumps({
        "benchmark": "export", "method": args.method, "arch": args.arch or "tiny",
        "image_size": size, "batch_size": args.batch_size, "images": args.images,
        "platform": jax.export.default_export_platform(), "devices": jax.device_count(),
        "export_s": round(export_s, 2), "weights_mb": round(weights_mb, 2),
        "artifact_load_s": round(load_s, 3), "artifact_first_call_s": round(artifact_first, 2),
        "artifact_images_per_s": round(args.images / artifact_s, 2),
        "predict_first_call_s": round(predict_first, 2),
        "predict_images_per_s": round(args.images / predict_s, 2),
        "predict_normalized_images_per_s": round(args.images / normalized_s, 2),
    }))


if __name__ == "__main__":
    main()
