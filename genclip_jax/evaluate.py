"""Batched zero-shot evaluation: per-class metric tables and heatmaps.

Any batch size works: every prediction is stored by its dataset index (padding rows dropped), so
results do not depend on batching (the reference code assumes batch 1). Maps and the blur run on
device; the metrics run on the host over each class's full-resolution maps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from genclip_jax import checkpoint, heatmaps, metrics, parallel
from genclip_jax.backbone import load_backbone
from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline
from genclip_jax.files import write_atomic
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


def make_predict_fn(method) -> Callable:
    """Jitted (params, clip_params, images, batch) -> {"anomaly_map", "image_score"}."""

    def predict(params, clip_params, images, batch):
        feats = method.encode_images(clip_params, images)
        return method.predict(params, clip_params, feats, batch)

    return jax.jit(predict)


@dataclasses.dataclass(frozen=True)
class Model:
    """A method with its prompts and frozen backbone placed on a mesh, and its jitted inference."""

    method: Any
    params: Any
    clip_params: Any
    mesh: Mesh
    predict: Callable


def load_model(config: ml_collections.ConfigDict, workdir: str, params=None) -> Model:
    """The model for `eval`/`predict`: `params` if given, else `load_trained_params`."""
    mesh = parallel.setup(config.parallel)
    parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    clip_config, clip_params = load_backbone(config.model)
    method = create_method(config, clip_config)
    if params is None:
        params = load_trained_params(config, workdir, method)
    return Model(
        method=method,
        params=parallel.replicate(jax.device_get(params), mesh),
        clip_params=parallel.replicate(clip_params, mesh),
        mesh=mesh,
        predict=make_predict_fn(method),
    )


def predictions(
    config: ml_collections.ConfigDict,
    model: Model,
    dataset: pipeline.Dataset,
    *,
    desc: str = "eval",
    skip_unreadable: bool = False,
) -> Iterator[tuple[dict, dict]]:
    """Per batch: (this host's input batch, outputs as global arrays sharded on "data").

    Outputs: anomaly_map (B, S, S), image_score (B,) and the batch's mask, label, index, valid.
    """
    batches = pipeline.batches(
        dataset, config.eval.batch_size, prefetch=config.data.prefetch,
        image_size=config.model.image_size, skip_unreadable=skip_unreadable,
    )
    total = pipeline.num_batches(len(dataset), config.eval.batch_size)
    for host_batch in tqdm(batches, total=total, desc=desc,
                           disable=not config.train.progress or jax.process_index() != 0):
        host_batch.update(model.method.host_inputs(host_batch))
        batch = parallel.global_batch(host_batch, model.mesh)
        pred = model.predict(model.params, model.clip_params, batch.pop("image"), batch)
        yield host_batch, {**pred, **{k: batch[k] for k in ("mask", "label", "index", "valid")}}


def predict_dataset(
    config: ml_collections.ConfigDict, model: Model, dataset: pipeline.Dataset
) -> dict[str, np.ndarray]:
    """Maps (N, S, S), image scores, masks (uint8) and labels of every sample, by dataset index."""
    n, size = len(dataset), config.model.image_size
    out = {
        "anomaly_map": np.zeros((n, size, size), np.float32),
        "image_score": np.zeros((n,), np.float32),
        "mask": np.zeros((n, size, size), np.uint8),
        "label": np.zeros((n,), np.int32),
    }
    for _, outputs in predictions(config, model, dataset):
        store_rows(out, parallel.gather(outputs))
    return out


def store_rows(out: dict[str, np.ndarray], rows: dict[str, np.ndarray]) -> None:
    """Writes the valid rows of one gathered batch into `out` at their dataset indices."""
    keep = rows["valid"].astype(bool)
    for key in out:
        out[key][rows["index"][keep]] = rows[key][keep]


def image_embeddings(
    config: ml_collections.ConfigDict, model: Model, dataset: pipeline.Dataset
) -> np.ndarray:
    """(N, D) the method's `class_image_features` of every sample, by dataset index."""
    embed = jax.jit(model.method.class_image_features)
    out = None
    batches = pipeline.batches(dataset, config.eval.batch_size, prefetch=config.data.prefetch,
                               image_size=config.model.image_size)
    for host_batch in batches:
        batch = parallel.global_batch(host_batch, model.mesh)
        rows = parallel.gather({"emb": embed(model.clip_params, batch["image"]),
                                "index": batch["index"], "valid": batch["valid"]})
        if out is None:
            out = {"emb": np.zeros((len(dataset), rows["emb"].shape[-1]), np.float32)}
        store_rows(out, rows)
    return out["emb"]


def adapt_to_classes(
    config: ml_collections.ConfigDict, model: Model, dataset: pipeline.Dataset,
    entries: Sequence[dict],
) -> dict:
    """Test-time adaptation of the method to the test classes (GenCLIP: class-name filtering).

    The image embeddings pass runs only if the method asks for a class's images.
    """
    names = np.array([e["cls_name"] for e in entries])
    embeddings = functools.cache(lambda: image_embeddings(config, model, dataset))
    decisions = model.method.prepare_eval(
        model.clip_params, [str(n) for n in dict.fromkeys(names)],
        lambda cls: embeddings()[names == cls],
    )
    for name, decision in decisions.items():
        logging.info("class %s -> prompt word %r (%s)", name, decision.word, decision)
    return decisions


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
            image = pipeline.image_transform(dataset.read(int(i)).image, size)
            written.append(heatmaps.save_panel(
                heatmaps.panel_path(out_dir / cls, entries[i]["img_path"]),
                pipeline.display_images(image), results["anomaly_map"][i],
                results["mask"][i] if results["label"][i] else None, value_range,
            ))
    return written


def evaluate(config: ml_collections.ConfigDict, workdir: str, params=None) -> dict:
    """Evaluates on `data.test_root`; writes `eval/metrics.{md,csv,json}` and heatmaps.

    Returns {class: {metric: value}}; `params` default: `eval.params` or the latest checkpoint.
    """
    if not config.data.test_root:
        raise ValueError("data.test_root: set the root of the test dataset (with meta.json)")
    root = config.data.test_root
    meta = meta_lib.read_meta(pathlib.Path(root) / "meta.json", root=root)
    entries = meta_lib.split_entries(
        meta, config.data.test_split, list(config.data.test_classes) or None
    )
    dataset = pipeline.Dataset.from_entries(root, entries)
    model = load_model(config, workdir, params)
    decisions = adapt_to_classes(config, model, dataset, entries)
    results = predict_dataset(config, model, dataset)
    rows = class_rows(entries, results, config)
    if jax.process_index() == 0:
        out_dir = pathlib.Path(workdir) / "eval"
        paths = metrics.write_tables(rows, out_dir)
        if decisions:
            text = json.dumps({k: dataclasses.asdict(d) for k, d in decisions.items()}, indent=2)
            write_atomic(out_dir / "class_names.json", text + "\n")
        write_heatmaps(out_dir / "heatmaps", dataset, entries, results,
                       config.eval.heatmaps_per_class)
        logging.info("wrote %s", ", ".join(str(p) for p in paths.values()))
        print(metrics.format_markdown(rows))
    return rows
