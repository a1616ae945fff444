"""Scores any folder of images (no labels): `scores.csv` and heatmap PNGs."""

from __future__ import annotations

import csv
import io
import os
import pathlib

import jax
import ml_collections
import numpy as np

from genclip_jax import evaluate, heatmaps, parallel
from genclip_jax.backbone import load_backbone
from genclip_jax.data import pipeline
from genclip_jax.methods import create_method


def write_scores(path: pathlib.Path, names: list[str], results: dict[str, np.ndarray]) -> None:
    """CSV of (image, image_score, max of the anomaly map), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "image_score", "pixel_max"])
    for i, name in enumerate(names):
        writer.writerow([name, f"{results['image_score'][i]:.6f}",
                         f"{results['anomaly_map'][i].max():.6f}"])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def predict_folder(
    config: ml_collections.ConfigDict, workdir: str, images: str, out_dir: str
) -> pathlib.Path:
    """Scores every readable image under `images`; returns the path of scores.csv."""
    parallel.initialize(config.parallel)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    clip_config, clip_params = load_backbone(config.model)
    method = create_method(config, clip_config)
    params = parallel.replicate(
        jax.device_get(evaluate.load_trained_params(config, workdir, method)), mesh
    )
    clip_params = parallel.replicate(clip_params, mesh)
    dataset = pipeline.image_folder_dataset(images)
    if not len(dataset):
        raise ValueError(f"{images}: no readable image found")
    results = evaluate.predict_dataset(
        config, method, params, clip_params, dataset, mesh, desc="predict"
    )
    names = [dataset.read(i).img_path for i in range(len(dataset))]
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        write_scores(out / "scores.csv", names, results)
        size = results["anomaly_map"].shape[-1]
        for i, name in enumerate(names):
            stem = pathlib.Path(name).with_suffix("").as_posix().replace("/", "_")
            heatmaps.save_panel(out / "heatmaps" / f"{stem}.png",
                                evaluate.display_image(dataset, i, size),
                                results["anomaly_map"][i])
    return out / "scores.csv"
