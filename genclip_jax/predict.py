"""Scores any folder of images (no labels): `scores.csv` and heatmap PNGs.

Each image is decoded once: the heatmaps show the batch's own (de-normalised) pixels and are
written per batch by the host that loaded them, so no map of the whole folder is kept in memory.
Files that are not images, or whose pixels do not decode, are skipped with one warning.
"""

from __future__ import annotations

import csv
import io
import pathlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from genclip_jax import evaluate, heatmaps, parallel
from genclip_jax.data import pipeline
from genclip_jax.files import write_atomic

_pixel_max = jax.jit(lambda maps: maps.max(axis=(1, 2)))


def write_scores(path: pathlib.Path, names: Sequence[str], scores: dict[str, np.ndarray]) -> None:
    """CSV of (image, image_score, pixel_max), one row per name, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "image_score", "pixel_max"])
    for i, name in enumerate(names):
        writer.writerow([name, f"{scores['image_score'][i]:.6f}", f"{scores['pixel_max'][i]:.6f}"])
    write_atomic(path, buffer.getvalue())


def _save_host_panels(
    out: pathlib.Path, names: Sequence[str], host_batch: dict, outputs: dict
) -> None:
    """Heatmap panels of this host's valid rows of one batch."""
    maps = parallel.host_local(outputs["anomaly_map"])
    images = pipeline.display_images(host_batch["image"])
    for r in np.flatnonzero(host_batch["valid"]):
        name = names[host_batch["index"][r]]
        heatmaps.save_panel(heatmaps.panel_path(out, name), images[r], maps[r])


def predict_folder(
    config: ml_collections.ConfigDict, workdir: str, images: str, out_dir: str
) -> pathlib.Path:
    """Scores every readable image under `images`; returns the path of scores.csv."""
    entries, skipped = pipeline.scan_image_folder(images)
    names = [e["img_path"] for e in entries]
    dataset = pipeline.Dataset.from_entries(images, entries)
    model = evaluate.load_model(config, workdir)
    out = pathlib.Path(out_dir)
    n = len(dataset)
    scores = {"image_score": np.zeros(n, np.float32), "pixel_max": np.zeros(n, np.float32),
              "read": np.zeros(n, bool)}
    for host_batch, outputs in evaluate.predictions(
        config, model, dataset, desc="predict", skip_unreadable=True
    ):
        _save_host_panels(out / "heatmaps", names, host_batch, outputs)
        evaluate.store_rows(scores, parallel.gather({
            "image_score": outputs["image_score"], "index": outputs["index"],
            "valid": outputs["valid"], "read": outputs["valid"],
            "pixel_max": _pixel_max(outputs["anomaly_map"]),
        }))
    read = scores.pop("read")
    pipeline.warn_skipped(images, [*skipped, *(names[i] for i in np.flatnonzero(~read))])
    if not read.any():
        raise ValueError(f"{images}: expected at least one readable image, found none")
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_scores(out / "scores.csv", [names[i] for i in np.flatnonzero(read)],
                     {k: v[read] for k, v in scores.items()})
    return out / "scores.csv"
