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

from genclip_jax import evaluate, files, heatmaps, parallel, run_dir, validate
from genclip_jax.data import pipeline
from genclip_jax.files import write_atomic
from genclip_jax.methods import needs_training

_pixel_max = jax.jit(lambda maps: maps.max(axis=(1, 2)))


def write_scores(path: pathlib.Path, rows: Sequence[tuple[str, float, float, str]]) -> None:
    """CSV of (image, image_score, pixel_max, heatmap), one row per image, written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "image_score", "pixel_max", "heatmap"])
    for name, score, pixel_max, panel in rows:
        writer.writerow([name, f"{score:.6f}", f"{pixel_max:.6f}", panel])
    write_atomic(path, buffer.getvalue())


def _save_host_panels(
    out: pathlib.Path, panels: Sequence[str], host_batch: dict, outputs: dict
) -> None:
    """Heatmap panels of this host's valid rows of one batch."""
    maps = parallel.host_local(outputs["anomaly_map"])
    images = pipeline.display_images(host_batch["image"])
    for r in np.flatnonzero(host_batch["valid"]):
        heatmaps.save_panel(out / panels[host_batch["index"][r]], images[r], maps[r])


def check_apart(images: pathlib.Path, out: pathlib.Path) -> None:
    """The output replaces `out` as a whole and the next run scans `images`: neither may hold
    the other."""
    images, out = images.resolve(), out.resolve()
    if out == images or images in out.parents:
        raise ValueError(f"--out={out} is inside --images={images}: the heatmaps would be scored "
                         "as images on the next run; give an --out outside the image folder")
    if out in images.parents:
        raise ValueError(f"--images={images} is inside --out={out}, which is replaced as a "
                         "whole; give an --out that does not contain the images")


def predict_folder(
    config: ml_collections.ConfigDict, workdir: str, images: str, out_dir: str | None = None
) -> pathlib.Path:
    """Scores every readable image under `images` into `out_dir` (default `<workdir>/predict`),
    replaced as a whole: scores.csv and heatmaps/. Returns the path of scores.csv.

    The run itself is only read, so a read-only run works given an `out_dir` elsewhere.
    """
    validate.validate(config, "predict")
    flag = "--out" if out_dir else f"predict output (default of --out, in the run {workdir})"
    out = pathlib.Path(out_dir) if out_dir else run_dir.RunDir(workdir).predict_dir()
    check_apart(pathlib.Path(images), out)
    out = files.check_replaceable(out, flag)
    parallel.initialize(config.parallel)  # before the first question to JAX
    if jax.process_index() == 0:
        files.check_writable(out.parent, flag)
    if not config.eval.params and needs_training(config.method):  # before the backbone loads
        run_dir.RunDir(workdir).check_readable(config)
    entries, skipped = pipeline.scan_image_folder(images)
    names = [e["img_path"] for e in entries]
    panels = heatmaps.panel_names(names)
    dataset = pipeline.Dataset.from_entries(images, entries)
    model = evaluate.load_model(config, workdir)
    n = len(dataset)
    scores = {"image_score": np.zeros(n, np.float32), "pixel_max": np.zeros(n, np.float32),
              "read": np.zeros(n, bool)}
    with run_dir.staged_output(out) as stage:
        for host_batch, outputs in evaluate.predictions(
            config, model, dataset, desc="predict", skip_unreadable=True
        ):
            _save_host_panels(stage / "heatmaps", panels, host_batch, outputs)
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
            write_scores(stage / "scores.csv", [
                (names[i], float(scores["image_score"][i]), float(scores["pixel_max"][i]),
                 f"heatmaps/{panels[i]}") for i in np.flatnonzero(read)
            ])
    return out / "scores.csv"
