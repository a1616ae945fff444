"""Batched zero-shot evaluation: per-class metric tables and heatmaps.

Any batch size works: every prediction is stored by its dataset index (padding rows dropped), so
results do not depend on batching (the reference code assumes batch 1). Maps and the blur run on
device; the metrics run on the host over each class's maps (at the model's size, or at
`eval.metric_size`).

Evaluation streams: batches arrive in dataset order, which `meta.split_entries` groups by class,
and a class's metrics are computed as soon as its last image arrives, then its maps are dropped.
Process 0 keeps the class being filled (plus the maps of the panels to draw); other processes
keep nothing. Host memory is bounded by the largest class, not the dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from PIL import Image
from tqdm import tqdm

from genclip_jax import (
    checkpoint,
    fewshot,
    files,
    heatmaps,
    host_memory,
    metrics,
    parallel,
    run_dir,
    steps,
    validate,
)
from genclip_jax.backbone import load_backbone
from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline
from genclip_jax.files import write_atomic
from genclip_jax.methods import Adaptation, create_method, needs_training


def load_trained_params(
    config: ml_collections.ConfigDict, workdir: str, method, mesh: Mesh,
    unpinned: Sequence[str] = (),
) -> tuple[Any, str]:
    """(params, where from): prompt params from `eval.params` (a params export) or the run's
    latest checkpoint, read without writing anything and without building an optimizer,
    replicated on `mesh`. `unpinned`: see `run_dir.RunDir.check_readable`."""
    shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0))
    template = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
        shapes,
    )
    source = config.eval.params
    try:
        if source:
            return checkpoint.load_params(source, template)[0], source
        run = run_dir.RunDir(workdir)
        run.check_readable(config, unpinned)
        with checkpoint.Checkpointer(run.checkpoints, read_only=True) as ckpt:
            source = str(ckpt.step_path(ckpt.latest_step()))
            return ckpt.restore_params(template), source
    except checkpoint.ShapeMismatchError as err:
        hints = method.shape_hints(err.stored)
        if not hints:
            raise
        fields = " ".join(f"--config.{h.split(' ')[0]}" for h in hints)
        raise ValueError(
            f"the prompts in {source} do not fit this config; their shapes imply:\n  "
            + "\n  ".join(hints) + f"\nSet {fields} (or use the run's config)."
        ) from err


def make_predict_fn(method) -> Callable:
    """Jitted (params, clip_params, uint8 images, batch) -> {"anomaly_map", "image_score"}."""
    return functools.partial(steps.predict, method)


@dataclasses.dataclass(frozen=True)
class Model:
    """A method with its prompts and frozen backbone placed on a mesh, and its jitted inference."""

    method: Any
    params: Any
    clip_params: Any
    mesh: Mesh
    predict: Callable  # the method's own (zero-shot) inference
    source: str  # where the params came from: a checkpoint step, a params export, the caller
    adaptation: Adaptation = dataclasses.field(default_factory=dict)  # of `prepare_eval`
    # `fewshot.k` > 0 for a `fewshot.PatchMethod`: the class memories fused into `infer`.
    references: fewshot.References | None = None
    classes: np.ndarray | None = None  # of each dataset index, from `adapt_to_classes`

    def infer(self, images: jax.Array, batch: dict, class_name: str = "",
              keep_others: bool = False) -> dict[str, jax.Array]:
        """Maps and scores of a global batch; with references, all its images are of
        `class_name` (see `fewshot.References.bank` for `keep_others`)."""
        if self.references is None:
            return self.predict(self.params, self.clip_params, images, batch)
        return self.references.predict(self.params, images, batch, class_name, keep_others)


def load_model(
    config: ml_collections.ConfigDict, workdir: str, params=None, unpinned: Sequence[str] = ()
) -> Model:
    """The model for `eval`/`predict`: `params` if given, else `load_trained_params`."""
    mesh = parallel.setup(config.parallel)
    parallel.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
    clip_config, clip_params = load_backbone(
        config.model, check=lambda clip: validate.check_backbone(config, clip)
    )
    method = create_method(config, clip_config)
    if params is None and not needs_training(config.method):
        params, source = {}, f"no params: {config.method} needs no training"
    elif params is None:
        params, source = load_trained_params(config, workdir, method, mesh, unpinned)
    else:
        params, source = parallel.replicate(jax.device_get(params), mesh), "given params"
    clip_params = parallel.replicate(clip_params, mesh)
    references = None
    if config.fewshot.k and isinstance(method, fewshot.PatchMethod):
        references = fewshot.References(config.fewshot, method, clip_params, mesh,
                                        config.eval.batch_size)
    return Model(
        method=method,
        params=params,
        clip_params=clip_params,
        mesh=mesh,
        predict=make_predict_fn(method),
        source=source,
        references=references,
    )


@jax.jit
def map_range(maps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, S, S) maps -> their (B,) minima and (B,) maxima."""
    return maps.min(axis=(1, 2)), maps.max(axis=(1, 2))


def predictions(
    config: ml_collections.ConfigDict,
    model: Model,
    dataset: pipeline.Dataset,
    *,
    desc: str = "eval",
    skip_unreadable: bool = False,
) -> Iterator[tuple[dict, dict]]:
    """Per batch: (this host's input batch, outputs as global arrays sharded on "data").

    Outputs: anomaly_map (B, S, S), image_score (B,) and the batch's mask, label, has_mask,
    index, valid.
    """
    if model.references is None:
        plan = pipeline.host_batch_indices(len(dataset), config.eval.batch_size)
        batch_classes = [""] * len(plan)
    elif model.classes is None:
        raise ValueError("few-shot inference needs the images' classes: pass the model through "
                         "adapt_to_classes first")
    else:  # one class per batch: it runs against that class's references
        plan, batch_classes = pipeline.grouped_batch_indices(model.classes,
                                                             config.eval.batch_size)
    batches = pipeline.batches(
        dataset, plan, prefetch=config.data.prefetch, image_size=config.model.image_size,
        skip_unreadable=skip_unreadable,
    )
    for host_batch, class_name in tqdm(
            zip(batches, batch_classes, strict=True), total=len(plan), desc=desc,
            disable=not config.train.progress or jax.process_index() != 0):
        host_batch.update(model.method.host_inputs(host_batch, model.adaptation))
        batch = parallel.global_batch(host_batch, model.mesh)
        pred = model.infer(batch.pop("image"), batch, str(class_name))
        keys = ("mask", "label", "has_mask", "index", "valid")
        yield host_batch, {**pred, **{k: batch[k] for k in keys}}


def predict_dataset(
    config: ml_collections.ConfigDict, model: Model, dataset: pipeline.Dataset
) -> dict[str, np.ndarray]:
    """Maps (N, S, S), image scores, masks (uint8), labels and has_mask of every sample, by
    dataset index."""
    n, size = len(dataset), config.model.image_size
    out = {
        "anomaly_map": np.zeros((n, size, size), np.float32),
        "image_score": np.zeros((n,), np.float32),
        "mask": np.zeros((n, size, size), np.uint8),
        "label": np.zeros((n,), np.int32),
        "has_mask": np.zeros((n,), bool),
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
    embed = functools.partial(steps.class_image_features, model.method)
    out = None
    plan = pipeline.host_batch_indices(len(dataset), config.eval.batch_size)
    batches = pipeline.batches(dataset, plan, prefetch=config.data.prefetch,
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
) -> Model:
    """`model` with its method's adaptation to the test classes (GenCLIP: class-name
    filtering) for `predictions`. The image embeddings pass runs only if the method asks for a
    class's images.
    """
    names = np.array([e["cls_name"] for e in entries])
    embeddings = functools.cache(lambda: image_embeddings(config, model, dataset))
    decisions = model.method.prepare_eval(
        model.clip_params, [str(n) for n in dict.fromkeys(names) if n],
        lambda cls: embeddings()[names == cls],
    )
    for name, decision in decisions.items():
        logging.info("class %s: %s", name, decision)
    if model.references is not None:
        model.references.check(names.tolist())
    return dataclasses.replace(model, adaptation=decisions, classes=names)


def class_row(results: dict[str, np.ndarray], config: ml_collections.ConfigDict,
              name: str = "") -> dict[str, float]:
    """{metric: value} of one class's results (anomaly_map (N, S, S), mask, image_score,
    label, has_mask), plus the counts `metrics.COUNT_COLUMNS`.

    Image metrics count every image; pixel metrics the images whose mask is known (a defect
    without a mask has no pixel labels, under `data.missing_mask="ignore"`).
    """
    pixel = np.flatnonzero(results["has_mask"])
    logging.info("metrics of %s (%d images, %d with pixel labels)", name,
                 len(results["image_score"]), len(pixel))
    # A slice, not a copy, when every image has its mask (the usual case: no class-sized copy).
    rows = slice(None) if len(pixel) == len(results["has_mask"]) else pixel
    row = metrics.compute_class_metrics(
        results["anomaly_map"][rows], results["mask"][rows],
        results["image_score"], results["label"],
        metrics=list(config.eval.metrics), aupro_mode=config.eval.aupro_mode,
    )
    defective = results["label"] == 1
    row.update(zip(metrics.COUNT_COLUMNS, (float(defective.sum()), float(defective[rows].sum())),
                   strict=True))
    return row


def drop_counts_unless_needed(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The count columns stay only when some defect has no mask (they say how many did)."""
    if any(r[metrics.COUNT_COLUMNS[0]] != r[metrics.COUNT_COLUMNS[1]] for r in rows.values()):
        return rows
    return {name: {k: v for k, v in row.items() if k not in metrics.COUNT_COLUMNS}
            for name, row in rows.items()}


def class_rows(
    entries: Sequence[dict], results: dict[str, np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, dict[str, float]]:
    """{class: {metric: value}} of a whole set's results, classes in first-seen order; the
    counts `metrics.COUNT_COLUMNS` when some defect has no mask."""
    names = np.array([e["cls_name"] for e in entries])
    rows = {str(cls): class_row({k: v[names == cls] for k, v in results.items()}, config, cls)
            for cls in dict.fromkeys(names)}
    return drop_counts_unless_needed(rows)


def _resized(values: np.ndarray, size: int, resample: int) -> np.ndarray:
    mode = "F" if values.dtype == np.float32 else "L"
    return np.asarray(Image.fromarray(values, mode=mode).resize((size, size), resample))


@dataclasses.dataclass
class ClassResults:
    """One class's predictions, complete: `results` as `predict_dataset` holds them but masks
    boolean (what the metrics take without a copy; maps and masks at `eval.metric_size` when
    set), `indices` their dataset indices, `shown` the model-size (map, GT mask of a defect or
    None) of the first `heatmaps_per_class` images (copies: they keep no batch alive)."""

    name: str
    indices: np.ndarray
    results: dict[str, np.ndarray]
    shown: dict[int, tuple[np.ndarray, np.ndarray | None]]


def stream_classes(
    config: ml_collections.ConfigDict, model: Model, dataset: pipeline.Dataset,
    entries: Sequence[dict],
) -> Iterator[ClassResults | tuple[float, float]]:
    """Yields each class's `ClassResults` as soon as its last image is predicted (on process 0;
    other processes take part in every batch and yield nothing), then the (min, max) of every
    map of the set, for the heatmaps' common range.
    """
    names = np.array([e["cls_name"] for e in entries])
    classes = {cls: np.flatnonzero(names == cls) for cls in dict.fromkeys(names)}
    position = np.zeros(len(names), np.int64)
    for idx in classes.values():
        position[idx] = np.arange(len(idx))
    remaining = {cls: len(idx) for cls, idx in classes.items()}
    size, model_size = config.eval.metric_size or config.model.image_size, config.model.image_size
    lead = jax.process_index() == 0
    open_classes: dict[str, ClassResults] = {}
    low, high = np.inf, -np.inf
    for _, outputs in predictions(config, model, dataset):
        low_high = map_range(outputs["anomaly_map"])
        rows = parallel.gather({**outputs, "low": low_high[0], "high": low_high[1]})
        if not lead:
            continue
        keep = np.flatnonzero(rows["valid"])
        low = min(low, float(rows["low"][keep].min(initial=np.inf)))
        high = max(high, float(rows["high"][keep].max(initial=-np.inf)))
        for r in keep[np.argsort(rows["index"][keep])]:
            i = int(rows["index"][r])
            cls = str(names[i])
            if cls not in open_classes:
                n = len(classes[cls])
                open_classes[cls] = ClassResults(cls, classes[cls], {
                    "anomaly_map": np.zeros((n, size, size), np.float32),
                    "image_score": np.zeros((n,), np.float32),
                    "mask": np.zeros((n, size, size), bool),
                    "label": np.zeros((n,), np.int32),
                    "has_mask": np.zeros((n,), bool),
                }, {})
            current = open_classes[cls]
            j = position[i]
            anomaly_map, mask = rows["anomaly_map"][r], rows["mask"][r].astype(np.uint8)
            if j < config.eval.heatmaps_per_class:
                current.shown[i] = (anomaly_map.copy(), mask if rows["label"][r] else None)
            if size != model_size:
                anomaly_map = _resized(anomaly_map, size, Image.BILINEAR)
                mask = _resized(mask, size, Image.NEAREST)
            current.results["anomaly_map"][j], current.results["mask"][j] = anomaly_map, mask
            for key in ("image_score", "label", "has_mask"):
                current.results[key][j] = rows[key][r]
            remaining[cls] -= 1
            if not remaining[cls]:
                del current  # the consumer's reference is then the only one
                yield open_classes.pop(cls)
    if lead:
        yield low, high


def write_heatmaps(
    out_dir: pathlib.Path,
    dataset: pipeline.Dataset,
    entries: Sequence[dict],
    shown: dict[int, tuple[np.ndarray, np.ndarray | None]],
    value_range: tuple[float, float],
) -> list[pathlib.Path]:
    """Panels of the `shown` images {dataset index: (model-size map, GT mask or None)}, every
    map on the value range of the whole set (in range.json beside them) so that panels compare
    across classes; files named by `heatmaps.panel_names` (unique per input path)."""
    panels = heatmaps.panel_names([e["img_path"] for e in entries])
    written = [write_atomic(out_dir / "range.json", json.dumps(
        {"value_range": list(value_range),
         "note": "every panel of this set shows the map on this range"}) + "\n")]
    for i, (anomaly_map, mask) in shown.items():
        image = pipeline.resize_image(dataset.read(i).image, anomaly_map.shape[-1])
        written.append(heatmaps.save_panel(out_dir / panels[i], image,
                                           anomaly_map, mask, value_range))
    return written


@dataclasses.dataclass(frozen=True)
class Target:
    """A test set whose every listed file was found, and the folder its results replace."""

    root: str
    entries: list[dict]
    dataset: pipeline.Dataset
    out: pathlib.Path


def prepare_target(
    config: ml_collections.ConfigDict, workdir: str, out: str | None = None
) -> Target:
    """What can be checked before any prediction: the test set's meta.json and every file it
    lists, its class names, and that the output folder `out` (default: the run's
    `eval/<name of the test root>/`) may be replaced and written."""
    root = config.data.test_root
    meta_path = pathlib.Path(root) / "meta.json"
    meta = meta_lib.read_meta(meta_path, root=root, check_files=True)
    classes = list(config.data.test_classes) or None
    entries = meta_lib.split_entries(meta, config.data.test_split, classes)
    if not entries:
        raise ValueError(f"{meta_path}: no images in split {config.data.test_split!r}"
                         + (f" for classes {classes}" if classes else "") + "; nothing to evaluate")
    validate.check_class_names((e["cls_name"] for e in entries), str(meta_path))
    flag = "--out" if out else f"eval output (default of --out, in the run {workdir})"
    out_dir = files.check_replaceable(
        out or run_dir.RunDir(workdir).eval_dir(root, fewshot.label(config.fewshot)), flag)
    parallel.initialize(config.parallel)  # before the first question to JAX
    if jax.process_index() == 0:
        files.check_writable(out_dir.parent, flag)
    dataset = pipeline.Dataset.from_entries(root, entries, config.data.missing_mask)
    return Target(root, entries, dataset, out_dir)


def adaptation_record(adaptation: Adaptation) -> dict[str, dict]:
    """{class: its decision's fields}, leaving out array fields (WinCLIP's text embeddings and
    memories): what class_names.json keeps; {} when nothing but arrays was adapted."""
    record = {
        name: {f.name: getattr(d, f.name) for f in dataclasses.fields(d)
               if not isinstance(getattr(d, f.name), (np.ndarray, Mapping))}
        for name, d in adaptation.items()
    }
    return record if any(record.values()) else {}


def table_name(config: ml_collections.ConfigDict, root: str) -> tuple[str, str]:
    """(file stem, title) of a set's tables: few-shot ones name k and the references' seed."""
    label = fewshot.label(config.fewshot)
    if not label:
        return "metrics", ""
    return f"metrics_{label}", (f"{pathlib.Path(root).absolute().name}: {config.fewshot.k}-shot, "
                                f"references drawn with fewshot.seed={config.fewshot.seed} from "
                                f"{config.fewshot.reference} ({config.fewshot.split} split)")


def write_results(
    config: ml_collections.ConfigDict, model: Model, target: Target, rows: dict,
    shown: dict[int, tuple[np.ndarray, np.ndarray | None]], value_range: tuple[float, float],
) -> None:
    """Replaces `target.out` as a whole: tables, CNF decisions and eval.json first, heatmaps
    last; heatmaps that fail do not cost the tables (they land, then the error is raised)."""
    lead = jax.process_index() == 0
    failure = None
    with run_dir.staged_output(target.out) as stage:
        if lead:
            metrics.write_tables(rows, stage, *table_name(config, target.root))
            if decisions := adaptation_record(model.adaptation):
                write_atomic(stage / "class_names.json", json.dumps(decisions, indent=2) + "\n")
            info = {"test_root": str(pathlib.Path(target.root).absolute()),
                    "test_split": config.data.test_split, "images": len(target.entries),
                    "classes": list(rows), "model": model.source,
                    "config": run_dir.config_to_dict(config)}
            write_atomic(stage / "eval.json", json.dumps(info, indent=2) + "\n")
            try:
                write_heatmaps(stage / "heatmaps", target.dataset, target.entries, shown,
                               value_range)
            except (OSError, ValueError) as err:
                failure = err
    if failure is not None:
        raise RuntimeError(f"writing the heatmaps failed ({failure}); the tables are complete "
                           f"in {target.out}") from failure
    if lead:
        print(metrics.format_markdown(rows, table_name(config, target.root)[1]))
        print(f"results in {target.out}")


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, params=None, out: str | None = None
) -> dict:
    """Evaluates on `data.test_root`: tables, heatmaps and eval.json replace the folder `out`
    (default: `<workdir>/eval/<name of the test root>/`). Never writes anything else.

    Returns {class: {metric: value}}; `params` default: `eval.params` or the latest checkpoint.
    """
    validate.validate(config, "eval")
    target = prepare_target(config, workdir, out)
    if config.fewshot.k and not config.fewshot.reference:  # the target's own train split
        config = config.copy_and_resolve_references()
        config.fewshot.reference = target.root
    if params is None and not config.eval.params and needs_training(config.method):
        run_dir.RunDir(workdir).check_readable(config)  # before the backbone is loaded
    model = load_model(config, workdir, params)
    model = adapt_to_classes(config, model, target.dataset, target.entries)
    rows, shown, value_range = {}, {}, (0.0, 0.0)
    for item in stream_classes(config, model, target.dataset, target.entries):
        if isinstance(item, tuple):
            value_range = item
            continue
        rows[item.name] = class_row(item.results, config, item.name)
        shown.update(item.shown)
        del item  # else its maps stay alive while the next class fills
        host_memory.release_free_memory()  # the next class fills pages, not fragments
    rows = drop_counts_unless_needed(rows)
    write_results(config, model, target, rows, shown, value_range)
    return rows
