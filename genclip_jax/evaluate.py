"""Batched zero-shot evaluation: per-class metric tables and heatmaps.

Any batch size works: every prediction is stored by its dataset index (padding rows dropped), so
results do not depend on batching (the reference code assumes batch 1). Maps and the blur run on
device; the metrics run on the host over each class's full-resolution maps.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from genclip_jax import checkpoint, heatmaps, metrics, parallel
from genclip_jax.backbone import load_backbone
from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline
from genclip_jax.methods import create_method


def load_trained_params(config: ml_collections.ConfigDict, workdir: str, method):
    """Prompt params from `eval.params` (a params export) or the workdir's latest checkpoint."""
    template = method.init(jax.random.PRNGKey(0))
    if config.eval.params:
        params, _ = checkpoint.load_params(config.eval.params, template)
        return params
    from genclip_jax import train

    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(
            f"no checkpoint in {ckpt_dir}: train first, or set eval.params to a params export "
            "(e.g. the output of `genclip-jax convert`)"
        )
    tx = train.make_optimizer(config.train)
    with checkpoint.Checkpointer(workdir, config, keep=config.train.checkpoint_keep) as ckpt:
        state = ckpt.restore(train.create_train_state(method, tx, config.train.seed))
    return state.params


def make_predict_fn(method):
    """Jitted (params, clip_params, images, batch) -> {"anomaly_map", "image_score"}."""

    def predict(params, clip_params, images, batch):
        feats = method.encode_images(clip_params, images)
        return method.predict(params, clip_params, feats, batch)

    return jax.jit(predict)


def predict_dataset(
    config: ml_collections.ConfigDict,
    method,
    params,
    clip_params,
    dataset: pipeline.Dataset,
    mesh,
    desc: str = "eval",
) -> dict[str, np.ndarray]:
    """Runs the method over a dataset: maps (N, S, S), scores, masks, labels by dataset index."""
    predict = make_predict_fn(method)
    n, size = len(dataset), config.model.image_size
    out = {
        "anomaly_map": np.zeros((n, size, size), np.float32),
        "image_score": np.zeros((n,), np.float32),
        "mask": np.zeros((n, size, size), np.uint8),
        "label": np.zeros((n,), np.int32),
    }
    batches = pipeline.batches(
        dataset, config.eval.batch_size, prefetch=config.data.prefetch, image_size=size
    )
    total = pipeline.num_batches(n, config.eval.batch_size)
    for host_batch in tqdm(batches, total=total, desc=desc,
                           disable=not config.train.progress or jax.process_index() != 0):
        host_batch.update(method.host_inputs(host_batch))
        batch = parallel.global_batch(host_batch, mesh)
        pred = predict(params, clip_params, batch.pop("image"), batch)
        rows = parallel.gather({**pred, "mask": batch["mask"], "label": batch["label"],
                                "index": batch["index"], "valid": batch["valid"]})
        keep = rows["valid"].astype(bool)
        idx = rows["index"][keep]
        for key in out:
            out[key][idx] = rows[key][keep]
    return out


def class_rows(
    entries: Sequence[dict], results: dict[str, np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, dict[str, float]]:
    """{class: {metric: value}} in the order classes first appear in the dataset."""
    names = np.array([e["cls_name"] for e in entries])
    rows = {}
    for cls in dict.fromkeys(names):
        idx = np.flatnonzero(names == cls)
        logging.info("metrics of %s (%d images)", cls, len(idx))
        rows[cls] = metrics.compute_class_metrics(
            results["anomaly_map"][idx], results["mask"][idx].astype(np.float32),
            results["image_score"][idx], results["label"][idx],
            metrics=list(config.eval.metrics), aupro_mode=config.eval.aupro_mode,
        )
    return rows


def display_image(dataset: pipeline.Dataset, i: int, size: int) -> np.ndarray:
    """Sample i as (size, size, 3) uint8, resized the way the model saw it."""
    image = dataset.read(i).image.convert("RGB")
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


def write_heatmaps(
    out_dir: pathlib.Path,
    dataset: pipeline.Dataset,
    entries: Sequence[dict],
    results: dict[str, np.ndarray],
    per_class: int,
) -> list[pathlib.Path]:
    """The first `per_class` images of each class, maps scaled by the class's value range."""
    names = np.array([e["cls_name"] for e in entries])
    written = []
    size = results["anomaly_map"].shape[-1]
    for cls in dict.fromkeys(names):
        idx = np.flatnonzero(names == cls)
        maps = results["anomaly_map"][idx]
        value_range = (float(maps.min()), float(maps.max()))
        for i in idx[:per_class]:
            stem = pathlib.Path(entries[i]["img_path"]).with_suffix("").as_posix()
            path = out_dir / cls / (stem.replace("/", "_") + ".png")
            written.append(heatmaps.save_panel(
                path, display_image(dataset, int(i), size), results["anomaly_map"][i],
                results["mask"][i] if results["label"][i] else None, value_range,
            ))
    return written


def evaluate(config: ml_collections.ConfigDict, workdir: str, params=None) -> dict:
    """Evaluates on `data.test_root`; writes `eval/metrics.{md,csv,json}` and heatmaps."""
    parallel.initialize(config.parallel)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    if not config.data.test_root:
        raise ValueError("data.test_root: set the root of the test dataset (with meta.json)")
    clip_config, clip_params = load_backbone(config.model)
    method = create_method(config, clip_config)
    if params is None:
        params = load_trained_params(config, workdir, method)
    params = parallel.replicate(jax.device_get(params), mesh)
    clip_params = parallel.replicate(clip_params, mesh)

    root = config.data.test_root
    meta = meta_lib.read_meta(pathlib.Path(root) / "meta.json", root=root)
    entries = meta_lib.split_entries(
        meta, config.data.test_split, list(config.data.test_classes) or None
    )
    dataset = pipeline.Dataset.from_entries(root, entries)
    results = predict_dataset(config, method, params, clip_params, dataset, mesh)
    rows = class_rows(entries, results, config)
    if jax.process_index() == 0:
        out_dir = pathlib.Path(workdir) / "eval"
        paths = metrics.write_tables(rows, out_dir)
        write_heatmaps(out_dir / "heatmaps", dataset, entries, results,
                       config.eval.heatmaps_per_class)
        logging.info("wrote %s", ", ".join(str(p) for p in paths.values()))
        print(metrics.format_markdown(rows))
    return rows
