"""Prompt training: `train(config, workdir)` built from small jitted pieces.

The backbone is frozen, so each step is `encode_images` (no gradient; optionally cached once for
all epochs) followed by `update` (text side forward, loss, Adam). Both are compiled once per
(method, config): a second run or seed with the same config reuses them. Batches are sharded over
the "data" mesh axis, parameters replicated. The loop counts steps on the host and reads device
values only to log and before a checkpoint; it dispatches a step while the one before runs, and
waits for that one (no transfer) before going further ahead: the device always has the next step
queued, and XLA:CPU's collectives over several devices were measured to deadlock with more steps
in flight. A checkpoint is written after every epoch and a run resumes from the latest one in its
workdir.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
from typing import Any, NoReturn

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from jax.sharding import Mesh
from tqdm import tqdm

from genclip_jax import checkpoint, parallel, run_dir, steps, validate
from genclip_jax.backbone import load_backbone
from genclip_jax.clip.vision import BATCH_AXES, VisionFeatures
from genclip_jax.data import anomaly_synthesis, pipeline
from genclip_jax.methods import create_method
from genclip_jax.metric_writers import MetricWriter, create_default_writer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


TrainMetrics = clu_metrics.Collection.create(
    loss=clu_metrics.Average.from_output("total"),
    image_loss=clu_metrics.Average.from_output("ce"),
    local_loss=clu_metrics.Average.from_output("local"),
)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam(lr, b1, b2, eps), no weight decay, no schedule (the official recipe). Equal values
    give the same object: the jitted update takes it as a static argument."""
    return _adam(float(cfg.lr), float(cfg.b1), float(cfg.b2), float(cfg.eps))


@functools.cache
def _adam(lr: float, b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def create_train_state(method, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = method.init(jax.random.PRNGKey(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_encode_fn(method):
    """Jitted frozen vision forward: (clip_params, uint8 images) -> VisionFeatures."""
    return functools.partial(steps.encode_images, method)


def make_update_fn(method, tx: optax.GradientTransformation):
    """Jitted (state, clip_params, feats, batch) -> (state, metrics) training update on given
    features (the batch's mask as the pipeline gives it, bool; the loss sees it as float32);
    donates the old state's buffers."""
    return functools.partial(_update, method, tx)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def _update(method, tx, state: TrainState, clip_params, feats: VisionFeatures, batch: dict):
    batch = {**batch, "mask": batch["mask"].astype(jnp.float32)}  # bool from the host pipeline
    loss_fn = lambda p: method.loss(p, clip_params, feats, batch)
    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    return new_state, TrainMetrics.single_from_model_output(**parts)



class FeatureCache:
    """This host's frozen vision features by dataset index (-1: a padding row), kept on the host.

    Each host holds the rows it was fed. The features of a padding row (a zero image) are cached
    like any row, so an epoch read from the cache is bit for bit the epoch it replaces.
    """

    def __init__(self) -> None:
        self._rows: dict[int, VisionFeatures] = {}

    def covers(self, plan: np.ndarray) -> bool:
        """Whether every host holds every row of its `plan` (the same answer on all hosts)."""
        return parallel.all_processes(all(int(i) in self._rows for i in np.unique(plan)))

    def put(self, indices: np.ndarray, feats: VisionFeatures) -> None:
        """Keeps this host's rows of the global `feats` of a batch whose rows are `indices`."""
        local = parallel.host_local(feats)
        for row, i in enumerate(indices):
            self._rows[int(i)] = jax.tree.map(
                lambda axis, x, r=row: np.take(x, r, axis=axis), BATCH_AXES, local
            )

    def get(self, indices: np.ndarray, mesh: Mesh) -> VisionFeatures:
        """The global features of a batch whose rows on this host are `indices`."""
        rows = [self._rows[int(i)] for i in indices]
        return jax.tree.map(
            lambda axis, *xs: parallel.global_array(np.stack(xs, axis=axis), mesh, axis),
            BATCH_AXES, *rows,
        )


def train_dataset(config: ml_collections.ConfigDict) -> pipeline.Dataset:
    """The training split; every listed file is checked now, and an empty split is an error."""
    root, split = config.data.train_root, config.data.train_split
    classes = list(config.data.train_classes) or None
    dataset = pipeline.Dataset.from_meta(root, split, classes,
                                         missing_mask=config.data.missing_mask)
    if not len(dataset):
        raise ValueError(
            f"{pathlib.Path(root) / 'meta.json'}: no images in split {split!r}"
            + (f" for classes {classes}" if classes else "") + "; nothing to train on "
            "(data.train_split picks the split; the official recipe trains on 'test')"
        )
    if not dataset.labels.any() and not config.train.synthetic_anomalies:
        logging.warning(
            "%s: split %r holds normal images only, so the prompts learn no defect; set "
            "--config.train.synthetic_anomalies=true to paste synthetic defects on them",
            pathlib.Path(root) / "meta.json", split)
    return dataset


def check_processes_agree(config: ml_collections.ConfigDict) -> None:
    """Multi-process runs: same config (but the process id) and same training meta.json."""
    shared = run_dir.config_to_dict(config)
    shared["parallel"].pop("process_id", None)
    parallel.check_same_on_all_processes("config", json.dumps(shared, sort_keys=True))
    meta = pathlib.Path(config.data.train_root) / "meta.json"
    parallel.check_same_on_all_processes("training data (meta.json)", meta.read_text())


def make_synthesizer(
    train_cfg: ml_collections.ConfigDict,
) -> anomaly_synthesis.AnomalySynthesizer | None:
    """The synthetic-defect augmentation of `train.synthetic_*`, or None when it is off."""
    if not train_cfg.synthetic_anomalies:
        return None
    return anomaly_synthesis.AnomalySynthesizer(
        seed=train_cfg.seed, fraction=train_cfg.synthetic_fraction,
        kinds=tuple(train_cfg.synthetic_kinds), weights=tuple(train_cfg.synthetic_weights),
    )


class NonFiniteLossError(FloatingPointError):
    """The loss of a step was NaN or infinite: training stops before that state is saved."""


def _read_checked(
    pending: list[tuple[int, Any]], epoch: int, ckpt: checkpoint.Checkpointer,
    train_cfg: ml_collections.ConfigDict,
) -> dict[str, float]:
    """The metric values of the last of the `pending` (step, metrics) (one device read for all);
    raises at the first step whose loss is not finite."""
    fetched = jax.device_get([m.compute() for _, m in pending])
    for (step, _), metrics in zip(pending, fetched, strict=True):
        values = {k: float(v) for k, v in metrics.items()}
        if not all(np.isfinite(v) for v in values.values()):
            _raise_non_finite(values, step, epoch, ckpt, train_cfg)
    return values


def _raise_non_finite(
    values: dict[str, float], step: int, epoch: int, ckpt: checkpoint.Checkpointer,
    train_cfg: ml_collections.ConfigDict,
) -> NoReturn:
    terms = " ".join(f"{k}={v:.6g}" for k, v in values.items())
    raise NonFiniteLossError(
        f"step {step} (epoch {epoch + 1}): the loss is not finite ({terms}); training stopped "
        f"and this state was not saved. {ckpt.last_good()}. Lower train.lr (now "
        f"{train_cfg.lr}) or check this epoch's data."
    )


def train(
    config: ml_collections.ConfigDict, workdir: str, writer: MetricWriter | None = None
) -> TrainState:
    """Trains the prompts; resumes from the workdir's latest checkpoint. Returns the final state.

    Everything is checked before the run directory is touched (config, data, the backbone's
    fit); a run that fails then leaves no trace that would block the corrected command. Metrics
    go to `writer` (default: TensorBoard under `workdir/logs` + console): `train/*` every
    `train.log_every_steps` steps, `epoch/*` (means over the epoch) at step = epoch number. A
    non-finite loss stops training at its step (`NonFiniteLossError`), a failed save at once
    (`checkpoint.CheckpointSaveError`); neither leaves a checkpoint of a bad state.
    """
    validate.validate(config, "train")
    dataset = train_dataset(config)
    run = run_dir.RunDir(workdir)
    run.check_resumable(config)
    mesh = parallel.setup(config.parallel)
    parallel.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    check_processes_agree(config)
    clip_config, clip_params = load_backbone(
        config.model, check=lambda clip: validate.check_backbone(config, clip)
    )
    method = create_method(config, clip_config)
    tx = make_optimizer(config.train)

    run.write_config(config)  # every check passed: from here on the run directory is written
    own_writer = writer is None
    writer = create_default_writer(str(run.path / "logs")) if own_writer else writer
    try:
        with checkpoint.Checkpointer(run.checkpoints, keep=config.train.checkpoint_keep) as ckpt:
            return _train_loop(config, dataset, method, tx, clip_params, mesh, ckpt, writer)
    finally:
        if own_writer:
            writer.close()


def _train_loop(config, dataset, method, tx, clip_params, mesh, ckpt, writer) -> TrainState:
    clip_params = parallel.replicate(clip_params, mesh)
    state = parallel.replicate(create_train_state(method, tx, config.train.seed), mesh)
    start_epoch = ckpt.latest_step() or 0
    if start_epoch:
        params, rest = ckpt.restore(state.params, {"step": state.step,
                                                   "opt_state": state.opt_state})
        state = TrainState(step=rest["step"], params=params, opt_state=rest["opt_state"])
        logging.info("resumed from the checkpoint of epoch %d in %s", start_epoch, ckpt.directory)
    step = int(state.step)  # counted on the host from here: no device read per step

    encode = make_encode_fn(method)
    update = make_update_fn(method, tx)
    synthesizer = make_synthesizer(config.train)
    cache = FeatureCache() if config.train.cache_features and synthesizer is None else None
    if config.train.cache_features and synthesizer is not None:
        logging.info("train.cache_features is off for this run: train.synthetic_anomalies "
                     "changes the images every epoch")
    order = {"shuffle": config.train.shuffle, "seed": config.train.seed}
    for epoch in range(start_epoch, config.train.epochs):
        plan = pipeline.host_batch_indices(len(dataset), config.train.batch_size, epoch=epoch,
                                           **order)
        cached = cache is not None and cache.covers(plan)
        batches = pipeline.batches(
            dataset, plan, prefetch=config.data.prefetch, image_size=config.model.image_size,
            with_images=not cached,
            synthesize=None if synthesizer is None else synthesizer.for_epoch(dataset.labels,
                                                                              epoch),
        )
        progress = tqdm(batches, total=len(plan), desc=f"epoch {epoch + 1}",
                        disable=not config.train.progress or jax.process_index() != 0)
        epoch_metrics, pending = None, []
        for host_batch in progress:
            host_batch.update(method.host_inputs(host_batch))
            batch = parallel.global_batch(host_batch, mesh)
            if cached:
                feats = cache.get(host_batch["index"], mesh)
            else:
                feats = encode(clip_params, batch.pop("image"))
                if cache is not None:
                    cache.put(host_batch["index"], feats)
            state, step_metrics = update(state, clip_params, feats, batch)
            step += 1
            if pending:  # one step ahead at most (see the module docstring)
                jax.block_until_ready(pending[-1][1])
            pending.append((step, step_metrics))
            epoch_metrics = (step_metrics if epoch_metrics is None
                             else epoch_metrics.merge(step_metrics))
            if step % config.train.log_every_steps == 0:
                values = _read_checked(pending, epoch, ckpt, config.train)
                writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
                pending = []
        if pending:  # no state with a non-finite loss behind it is saved
            _read_checked(pending, epoch, ckpt, config.train)
        # The checkpoint first: it is what a failure must not cost.
        ckpt.save(epoch + 1, state.params, {"step": state.step, "opt_state": state.opt_state})
        summary = {f"epoch/{k}": float(v) for k, v in epoch_metrics.compute().items()}
        writer.write_scalars(epoch + 1, summary)
    return state

