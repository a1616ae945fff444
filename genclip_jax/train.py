"""Prompt training: `train_and_evaluate(config, workdir)` built from small jitted pieces.

The backbone is frozen, so each step is `encode_images` (no gradient; optionally cached once for
all epochs) followed by `update` (text side forward, loss, Adam). Batches are sharded over the
"data" mesh axis, parameters replicated. A checkpoint is written after every epoch and a run
resumes from the latest one in its workdir.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from tqdm import tqdm

from genclip_jax import checkpoint, parallel
from genclip_jax.backbone import load_backbone
from genclip_jax.clip.vision import VisionFeatures
from genclip_jax.data import pipeline
from genclip_jax.methods import create_method
from genclip_jax.metric_writers import create_default_writer


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
    """Adam(lr, b1, b2, eps), no weight decay, no schedule (the official recipe)."""
    return optax.adam(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


def create_train_state(method, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = method.init(jax.random.PRNGKey(seed))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_encode_fn(method):
    """Jitted frozen vision forward: (clip_params, images) -> VisionFeatures."""
    return jax.jit(method.encode_images)


def make_update_fn(method, tx: optax.GradientTransformation):
    """Jitted training update on given features; donates the old state's buffers."""

    def update(state: TrainState, clip_params, feats: VisionFeatures, batch: dict):
        loss_fn = lambda p: method.loss(p, clip_params, feats, batch)
        (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        return new_state, TrainMetrics.single_from_model_output(**parts)

    return jax.jit(update, donate_argnums=(0,))


class FeatureCache:
    """This host's frozen vision features, by dataset index, kept on the host between epochs."""

    def __init__(self):
        self._rows: dict[int, VisionFeatures] = {}

    def __contains__(self, indices: np.ndarray) -> bool:
        return all(int(i) in self._rows for i in indices if i >= 0)

    def put(self, indices: np.ndarray, feats: VisionFeatures) -> None:
        local = parallel.host_local(feats)
        for row, i in enumerate(indices):
            if i >= 0:
                self._rows[int(i)] = jax.tree_util.tree_map(lambda x, r=row: x[:, r]
                                                            if x.ndim > 2 else x[r], local)

    def get(self, indices: np.ndarray, template: VisionFeatures) -> VisionFeatures:
        """Host-local stacked features; padding rows copy the first real row."""
        first = next(int(i) for i in indices if i >= 0)
        rows = [self._rows[int(i) if i >= 0 else first] for i in indices]
        return jax.tree_util.tree_map(
            lambda t, *xs: np.stack(xs, axis=1 if t.ndim > 2 else 0), template, *rows
        )


def _global_features(local: VisionFeatures, mesh) -> VisionFeatures:
    """Host rows of cached features -> global arrays; the batch axis is 0 or 1 (layer-major)."""
    def put(x: np.ndarray):
        if x.ndim == 2:
            return parallel.global_batch({"x": x}, mesh)["x"]
        moved = parallel.global_batch({"x": np.moveaxis(x, 1, 0)}, mesh)["x"]
        return jnp.moveaxis(moved, 0, 1)

    return jax.tree_util.tree_map(put, local)


def train_dataset(config: ml_collections.ConfigDict) -> pipeline.Dataset:
    if not config.data.train_root:
        raise ValueError("data.train_root: set the root of the training dataset (with meta.json)")
    return pipeline.Dataset.from_meta(
        config.data.train_root, config.data.train_split, list(config.data.train_classes) or None
    )


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains the prompts; resumes from the workdir's latest checkpoint. Returns the final state."""
    parallel.initialize(config.parallel)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    workdir_path = pathlib.Path(workdir)
    writer = create_default_writer(str(workdir_path / "logs"))
    clip_config, clip_params = load_backbone(config.model)
    method = create_method(config, clip_config)
    tx = make_optimizer(config.train)
    clip_params = parallel.replicate(clip_params, mesh)
    state = parallel.replicate(create_train_state(method, tx, config.train.seed), mesh)

    ckpt = checkpoint.Checkpointer(workdir_path, config, keep=config.train.checkpoint_keep)
    start_epoch = ckpt.latest_step() or 0
    if start_epoch:
        state = ckpt.restore(state, start_epoch)
        logging.info("resumed from the checkpoint of epoch %d in %s", start_epoch, workdir)

    dataset = train_dataset(config)
    encode = make_encode_fn(method)
    update = make_update_fn(method, tx)
    cache = FeatureCache() if config.train.cache_features else None
    steps_per_epoch = pipeline.num_batches(len(dataset), config.train.batch_size)
    image_size = config.model.image_size
    for epoch in range(start_epoch, config.train.epochs):
        epoch_metrics = None
        plan = pipeline.host_batch_indices(
            len(dataset), config.train.batch_size, shuffle=config.train.shuffle,
            seed=config.train.seed, epoch=epoch, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        cached = cache is not None and all(rows in cache for rows in plan)
        batches = pipeline.batches(
            dataset, config.train.batch_size, shuffle=config.train.shuffle,
            seed=config.train.seed, epoch=epoch, prefetch=config.data.prefetch,
            image_size=image_size,
        )
        progress = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}",
                        disable=not config.train.progress or jax.process_index() != 0)
        for host_batch in progress:
            host_batch.update(method.host_inputs(host_batch))
            indices = host_batch["index"]
            if cached:
                host_batch.pop("image", None)
                feats = _global_features(cache.get(indices, template), mesh)
                batch = parallel.global_batch(host_batch, mesh)
            else:
                batch = parallel.global_batch(host_batch, mesh)
                feats = encode(clip_params, batch.pop("image"))
                if cache is not None:
                    cache.put(indices, feats)
                    template = parallel.host_local(feats)
            state, step_metrics = update(state, clip_params, feats, batch)
            epoch_metrics = (step_metrics if epoch_metrics is None
                             else epoch_metrics.merge(step_metrics))
            step = int(state.step)
            if step % config.train.log_every_steps == 0:
                writer.write_scalars(step, {f"train/{k}": float(v) for k, v in
                                            step_metrics.compute().items()})
        summary = {f"epoch/{k}": float(v) for k, v in epoch_metrics.compute().items()}
        writer.write_scalars(epoch + 1, summary)
        ckpt.save(epoch + 1, state, force=True)
    ckpt.wait()
    ckpt.close()
    writer.flush()
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, then evaluates the final prompts on `data.test_root` (if set)."""
    from genclip_jax import evaluate

    state = train(config, workdir)
    if not config.data.test_root:
        return {}
    return evaluate.evaluate(config, workdir, params=state.params)
