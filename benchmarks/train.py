"""Training speed with and without the feature cache: steps/s and images/s per epoch.

The real `train.train` (PIL pipeline, frozen forward or cache, text side + loss + Adam, Orbax
checkpoint per epoch) with random weights at a real CLIP shape (default ViT-L/14@336px at 518) on
a one-class synthetic set. Step times come from the metric writer (`train/loss` is written each
step after the step's result is on the host). One JSON line per (cache, epoch); epoch 1 is timed
from the end of its first step (needs 2+ steps): backbone init, compilation and step 1 are
reported as `until_first_step_s`. With the cache, epoch 1 fills it and later epochs decode no
image and skip the encoder.

    python benchmarks/train.py --batch-size 1 --images 2 --epochs 2    # CPU: ~12 s per image
    python benchmarks/train.py --arch ViT-B/16 --image-size 224 --batch-size 8 --images 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import real_shape

from genclip_jax import train
from genclip_jax.data import pipeline
from genclip_jax.metric_writers import NoOpWriter


class StepClock(NoOpWriter):
    """Records when each step's `train/loss` arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def write_scalars(self, step, scalars) -> None:
        if "train/loss" in scalars:
            self.times.append(time.perf_counter())


def epoch_rows(times: list[float], start: float, steps: int, batch: int) -> list[dict]:
    """Per epoch: seconds and rates from step-end times (epoch 1 from its first step's end)."""
    rows = []
    for epoch in range(len(times) // steps):
        first = epoch * steps
        begin, timed = (times[0], steps - 1) if epoch == 0 else (times[first - 1], steps)
        seconds = times[first + steps - 1] - begin
        rows.append({"epoch": epoch + 1, "timed_steps": timed, "seconds": round(seconds, 3),
                     "steps_per_s": round(timed / seconds, 4) if timed else None,
                     "images_per_s": round(timed * batch / seconds, 4) if timed else None})
    rows[0]["until_first_step_s"] = round(times[0] - start, 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    real_shape.add_arguments(parser, batch_size=8)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    config = real_shape.config(args)
    config.train.epochs = args.epochs
    config.train.log_every_steps = 1
    steps = pipeline.num_batches(args.images, args.batch_size)
    for cache in (False, True):
        config.train.cache_features = cache
        clock = StepClock()
        with tempfile.TemporaryDirectory() as workdir:
            start = time.perf_counter()
            train.train(config, workdir, clock)
        for row in epoch_rows(clock.times, start, steps, args.batch_size):
            print(json.dumps({
                "benchmark": "train", "arch": args.arch, "image_size": args.image_size,
                "batch": args.batch_size, "images": args.images, "dtype": args.dtype,
                "cache_features": cache, "device": jax.devices()[0].device_kind, **row,
            }), flush=True)


if __name__ == "__main__":
    main()
