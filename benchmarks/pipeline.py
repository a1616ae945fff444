"""Images/s of the host input pipeline alone: PNG decode + PIL resize to 518 (uint8 batches: the
CLIP normalisation runs on device, in the vision tower).

Writes the synthetic MVTec-layout set once at a realistic source size (700x700 PNGs, ~1 MB each
like MVTec's) under /tmp, then times whole epochs of `pipeline.batches` per setting (one untimed
warm-up epoch first, so the page cache is hot as in training). JSON lines on stdout, one per
(num_threads, prefetch, synthetic anomalies off/on) setting; `cpu_ms_per_image` does not depend
on what else the machine runs, `images_per_s` does.

With synthetic anomalies on, every image counts as normal when the defects are drawn (as in a
normal-only training set), so `--synthetic-fraction` of all images get a pasted defect: the
training augmentation of `train.synthetic_anomalies`, all kinds at equal weights. Target: the
rate with it on stays >= 80 % of the rate without.

    python benchmarks/pipeline.py [--source-size 700] [--image-size 518] [--settings 1:0,2:2]
        [--synthetic off,on] [--synthetic-fraction 0.5]
"""

import argparse
import json
import os
import pathlib
import time

import numpy as np

from genclip_jax.data import anomaly_synthesis, pipeline, synthetic


def _dataset(root: pathlib.Path, source_size: int) -> pipeline.Dataset:
    if not (root / "meta.json").is_file():
        synthetic.write_synthetic_dataset(
            root, image_size=source_size, n_train_good=0, n_test_good=8, n_test_defect_per_type=4
        )
    return pipeline.Dataset.from_meta(root)


def _epoch(
    dataset: pipeline.Dataset,
    args: argparse.Namespace,
    threads: int,
    prefetch: int,
    synthesizer: anomaly_synthesis.AnomalySynthesizer | None,
    epoch: int,
) -> int:
    normal = np.zeros_like(dataset.labels)
    count = 0
    plan = pipeline.host_batch_indices(len(dataset), args.batch_size, epoch=epoch,
                                       process_index=0, process_count=1)
    for batch in pipeline.batches(
        dataset, plan, image_size=args.image_size, prefetch=prefetch, num_threads=threads,
        synthesize=None if synthesizer is None else synthesizer.for_epoch(normal, epoch),
    ):
        count += int(batch["valid"].sum())
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source-size", type=int, default=700)
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--settings", default="1:0,1:2,2:2,4:2", help="comma-separated num_threads:prefetch pairs"
    )
    parser.add_argument("--synthetic", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--synthetic-fraction", type=float, default=0.5)
    parser.add_argument(
        "--root",
        type=pathlib.Path,
        default=None,
        help="where the source PNGs live (default /tmp/genclip_bench_pipeline_S)",
    )
    args = parser.parse_args()
    root = args.root or pathlib.Path(f"/tmp/genclip_bench_pipeline_{args.source_size}")
    dataset = _dataset(root, args.source_size)
    synthesizer = anomaly_synthesis.AnomalySynthesizer(
        seed=0, fraction=args.synthetic_fraction, kinds=anomaly_synthesis.KINDS,
        weights=(1.0,) * len(anomaly_synthesis.KINDS),
    )
    for setting in args.settings.split(","):
        threads, prefetch = (int(v) for v in setting.split(":"))
        for synthetic_on in (s == "on" for s in args.synthetic.split(",")):
            _time(dataset, args, threads, prefetch, synthesizer if synthetic_on else None)


def _time(
    dataset: pipeline.Dataset,
    args: argparse.Namespace,
    threads: int,
    prefetch: int,
    synthesizer: anomaly_synthesis.AnomalySynthesizer | None,
) -> None:
    """Prints one JSON line: whole epochs of `pipeline.batches` after an untimed warm-up."""
    _epoch(dataset, args, threads, prefetch, synthesizer, epoch=0)
    start, cpu_start = time.perf_counter(), time.process_time()
    images = sum(_epoch(dataset, args, threads, prefetch, synthesizer, epoch=1 + e)
                 for e in range(args.epochs))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    print(
        json.dumps(
            {
                "benchmark": "pipeline",
                "source_size": args.source_size,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "num_threads": threads,
                "prefetch": prefetch,
                "synthetic_anomalies": synthesizer is not None,
                "synthetic_fraction": args.synthetic_fraction if synthesizer else 0.0,
                "images": images,
                "seconds": round(seconds, 3),
                "images_per_s": round(images / seconds, 2),
                # CPU time of all threads per image: does not depend on the machine load.
                "cpu_ms_per_image": round(1000 * cpu_seconds / images, 2),
                "cpu_count": os.cpu_count(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
