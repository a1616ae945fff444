"""Host memory of `genclip-jax eval`: peak RSS growth against the size of the set's maps.

Runs the real evaluation path (`evaluate.evaluate`: decode, gather, streaming per-class metrics,
tables and heatmaps) over N test images of K classes at image size S, with synthetic maps in place
of the model's (random smooth maps made on device from each image's index: the backbone's time is
not what this measures). The images are the synthetic set's, listed under K class names in a
meta.json of their own. A first evaluation of `--warmup-batches` classes of one batch each (it
holds one batch of maps at a time; each batch held 0.5 s, as long as a backbone would take)
compiles every program and brings the input pipeline to its steady state (the prefetched batches,
the one decoding, the one on device, the allocator arenas of those threads: O(batch), reached only
after a few batches). One JSON line: `baseline_rss_bytes` (the peak RSS after that, before the
evaluation starts), `peak_rss_bytes` (the peak after it), `dataset_map_bytes` (N x S x S x 4) and
`largest_class_map_bytes`. `--mode whole` measures the former path (every map of the set held, then
the metrics) for comparison. Target: at 600 images, 4 classes, 518, the growth stays under half of
`dataset_map_bytes`.

    python benchmarks/eval_memory.py --images 600 --classes 4 --image-size 518 [--mode whole]
        [--metric-size 256] [--warmup-batches 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import resource
import tempfile
import time

import jax

from genclip_jax import defaults, evaluate
from genclip_jax.clip.model import CLIPConfig
from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline, synthetic
from genclip_jax.methods import create_method


def _synthetic_maps(params, clip_params, images, batch):
    """{"anomaly_map": (B, S, S) smooth random maps in [0, 1], "image_score": (B,)}, by index."""
    del params, clip_params
    size = images.shape[1]
    keys = jax.vmap(jax.random.PRNGKey)(batch["index"])
    coarse = jax.vmap(lambda k: jax.random.uniform(k, (16, 16)))(keys)
    maps = jax.image.resize(coarse, (coarse.shape[0], size, size), "bilinear")
    return {"anomaly_map": maps, "image_score": maps.max(axis=(1, 2))}


_PREDICT = jax.jit(_synthetic_maps)


def _with_synthetic_maps(load_model, seconds_per_batch: float):
    """`load_model` with the synthetic maps, each batch taking at least `seconds_per_batch`: as
    slow as a backbone, so that the input pipeline's prefetch queue fills as it does in a real
    evaluation (the synthetic maps alone are faster than decoding)."""
    predict = _PREDICT

    def slow_predict(*args):
        time.sleep(seconds_per_batch)
        return predict(*args)

    def load(*args, **kwargs):
        return dataclasses.replace(load_model(*args, **kwargs),
                                   predict=slow_predict if seconds_per_batch else predict)
    return load


def _meta(root: pathlib.Path, files: list[dict], images: int, classes: int) -> None:
    """meta.json listing the synthetic test images `images` times in total, `classes` names."""
    per_class = images // classes
    test = {f"part{k}": [{**files[(k * per_class + i) % len(files)], "cls_name": f"part{k}"}
                         for i in range(per_class)] for k in range(classes)}
    meta_lib.write_meta({"train": {}, "test": test}, root / "meta.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mode", choices=("stream", "whole"), default="stream")
    parser.add_argument("--metric-size", type=int, default=0, help="eval.metric_size (stream)")
    parser.add_argument("--warmup-batches", type=int, default=6,
                        help="batches of the warm-up evaluation (1: compiling only)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "set"
        synthetic.write_synthetic_dataset(root, image_size=64)
        source = meta_lib.read_meta(root / "meta.json")
        files = [e for es in source["test"].values() for e in es]
        config = defaults.tiny_config()
        config.model.image_size = args.image_size
        config.data.test_root = str(root)
        config.eval.batch_size = args.batch_size
        config.eval.metric_size = args.metric_size
        config.train.progress = False
        params = create_method(config, CLIPConfig(**config.model.random_arch.to_dict())).init(
            jax.random.PRNGKey(0))
        load_model = evaluate.load_model
        evaluate.load_model = _with_synthetic_maps(load_model, 0.5)
        _meta(root, files, args.warmup_batches * args.batch_size, args.warmup_batches)
        evaluate.evaluate(config, "", params, out=str(pathlib.Path(tmp) / "warm"))
        evaluate.load_model = _with_synthetic_maps(load_model, 0.0)
        _meta(root, files, args.images, args.classes)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if args.mode == "stream":
            evaluate.evaluate(config, "", params, out=str(pathlib.Path(tmp) / "out"))
        else:
            entries = meta_lib.split_entries(meta_lib.read_meta(root / "meta.json"), "test")
            model = evaluate.load_model(config, "", params)
            results = evaluate.predict_dataset(
                config, model, pipeline.Dataset.from_entries(root, entries))
            evaluate.class_rows(entries, results, config)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = args.images // args.classes * args.classes
    map_bytes = args.image_size ** 2 * 4
    print(json.dumps({
        "benchmark": "eval_memory", "mode": args.mode, "images": n, "classes": args.classes,
        "image_size": args.image_size, "batch_size": args.batch_size,
        "warmup_batches": args.warmup_batches,
        "metric_size": args.metric_size or args.image_size,
        "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
        "growth_bytes": peak - baseline, "dataset_map_bytes": n * map_bytes,
        "largest_class_map_bytes": args.images // args.classes * map_bytes,
        "growth_over_dataset_maps": round((peak - baseline) / (n * map_bytes), 3),
    }), flush=True)


if __name__ == "__main__":
    main()
