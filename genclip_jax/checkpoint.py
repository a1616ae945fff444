"""Orbax checkpoints of a training run (read-write for `train`, read-only for everyone else) and
params-only exports.

Layout of one saved step under a run's ``checkpoints/``::

    <step>/params/   the learnable prompt params: all that eval, predict and export restore
    <step>/train/    {"step", "opt_state"}: what a resumed training needs besides the params

Runs written by genclip_jax 0.1.0 hold one item, ``<step>/default/`` = {"step", "params",
"opt_state"}; both kinds of reader still restore them.

Orbax writes each step into ``<step>.orbax-checkpoint-tmp-<time>`` and renames it when complete,
so an interrupted save never shows up as a step; the trainer's `Checkpointer` removes such
leftovers when it opens a run. A read-only `Checkpointer` never writes, renames or deletes
anything: it is safe on a shared, read-only model folder and beside a live training.

Multi-host: every process must call `Checkpointer(...)`, `save`, `restore`, `save_params` and
`load_params` (Orbax coordinates the processes and writes each array shard from its owner). Paths
must be on a filesystem all processes see.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from genclip_jax import files, parallel, trees

PyTree = Any

PARAMS = "params"
TRAIN = "train"
_LEGACY = "default"  # the single item of genclip_jax 0.1.0 checkpoints


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; training must stop (the cause is chained)."""


class ShapeMismatchError(ValueError):
    """Stored leaves disagree with the restore template; `stored` maps leaf paths to shapes."""

    def __init__(self, message: str, stored: dict[str, tuple[int, ...]]) -> None:
        super().__init__(message)
        self.stored = stored


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(dotted.leaf.path, leaf)]``; dotted paths match Orbax's names for the same leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(".".join(_key_name(k) for k in path), leaf) for path, leaf in leaves]


def leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """``{dotted.leaf.path: shape}``."""
    return {name: tuple(getattr(leaf, "shape", ())) for name, leaf in named_leaves(tree)}


def _check_shapes(stored_tree: PyTree, abstract: PyTree, where: str) -> None:
    """Refuse a restore whose template disagrees with the stored leaves (another config)."""
    stored = leaf_shapes(stored_tree)
    diff = trees.shape_differences(stored, leaf_shapes(abstract))
    problems = [f"{name}: checkpoint {got} vs template {want}" for name, got, want in diff.wrong]
    problems += [f"{name}: missing in checkpoint" for name in diff.missing]
    problems += [f"{name}: not in template" for name in diff.unexpected]
    if problems:
        raise ShapeMismatchError(
            f"checkpoint {where} does not match the restore template (was it written with "
            "another config?): " + "; ".join(problems),
            stored,
        )


def _abstract(template: PyTree) -> PyTree:
    """Shape/dtype/sharding of each leaf: Orbax restores onto exactly these (sharded if given)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, template)


def non_finite_leaves(tree: PyTree) -> list[str]:
    """Paths of the floating-point leaves holding NaN or inf (reduced on device, so replicated
    multi-host arrays work too)."""
    bad = []
    for name, leaf in named_leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            finite = jnp.isfinite(leaf).all()
            if not bool(np.asarray(finite.addressable_data(0))):
                bad.append(name)
    return bad


class Checkpointer:
    """Keep-last-N Orbax checkpoints of a run's ``checkpoints/`` folder.

    The trainer opens it read-write: saves are synchronous, so a failed save (a full disk, a lost
    permission) raises `CheckpointSaveError` at once instead of failing unseen in a background
    thread. Everyone else opens it with ``read_only=True``: no folder is created, no leftover
    cleaned up, nothing written.
    """

    def __init__(
        self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep: expected >= 1 checkpoints to keep, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        self.read_only = read_only
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoints folder {self.directory}")
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in (PARAMS, TRAIN):
            registry.add(item, ocp.args.StandardSave)
            registry.add(item, ocp.args.StandardRestore)
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, cleanup_tmp_directories=False,
                save_interval_steps=0, enable_async_checkpointing=False,
            )
        else:
            options = ocp.CheckpointManagerOptions(
                save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(1),
                preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
                create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False,
            )
        self._manager = ocp.CheckpointManager(
            self.directory, handler_registry=registry, options=options
        )

    def latest_step(self) -> int | None:
        """Newest complete checkpoint step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints kept, oldest first."""
        return sorted(self._manager.all_steps())

    def step_path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, params: PyTree, train_state: PyTree) -> bool:
        """Saves `params` and `train_state` as step `step`; False if `step` is not newer than the
        latest checkpoint (a final save after a periodic one is harmless).

        Raises:
          ValueError: a leaf holds NaN or inf (a diverged run is never checkpointed).
          CheckpointSaveError: the write failed; the message names the last complete checkpoint.
        """
        if self.read_only:
            raise RuntimeError(f"{self.directory}: opened read-only, cannot save")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        bad = non_finite_leaves({PARAMS: params, TRAIN: train_state})
        if bad:
            raise ValueError(f"step {step}: non-finite values in {bad}; a diverged state is "
                             f"never saved. {self.last_good()}")
        try:
            return self._manager.save(step, args=ocp.args.Composite(**{
                PARAMS: ocp.args.StandardSave(params), TRAIN: ocp.args.StandardSave(train_state),
            }))
        except Exception as err:
            raise CheckpointSaveError(
                f"could not save the checkpoint of step {step} under {self.directory}: "
                f"{type(err).__name__}: {err}. {self.last_good()}"
            ) from err

    def last_good(self) -> str:
        """A sentence naming the newest complete checkpoint, for errors that stop a run."""
        latest = self.latest_step()
        if latest is None:
            return "There is no complete checkpoint yet"
        return f"The last complete checkpoint is step {latest} ({self.step_path(latest)})"

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint to restore under {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} under {self.directory}; "
                f"available steps: {self.all_steps()}"
            )
        return step

    def restore_params(self, template: PyTree, step: int | None = None) -> PyTree:
        """The prompt params of `step` (default: latest) onto `template`'s shapes, dtypes and
        shardings; `template` may hold `jax.ShapeDtypeStruct`s (`jax.eval_shape`)."""
        return self._restore(step, template, None)[0]

    def restore(
        self, params_template: PyTree, train_template: PyTree, step: int | None = None
    ) -> tuple[PyTree, PyTree]:
        """(params, train_state) of `step` (default: latest), for resuming training."""
        return self._restore(step, params_template, train_template)

    def _restore(self, step, params_template, train_template) -> tuple[PyTree, PyTree]:
        step = self._resolve(step)
        where = self.step_path(step)
        if (where / _LEGACY).is_dir():
            return _restore_legacy(where / _LEGACY, params_template, train_template)
        templates = {PARAMS: params_template, TRAIN: train_template}
        metadata = self._manager.item_metadata(step)
        args = {}
        for item, template in templates.items():
            if template is not None:
                abstract = _abstract(template)
                _check_shapes(metadata[item].tree, abstract, f"{where}/{item}")
                args[item] = ocp.args.StandardRestore(abstract)
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return restored[PARAMS], (restored[TRAIN] if train_template is not None else None)

    def close(self) -> None:
        """Releases Orbax's resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _restore_legacy(path: pathlib.Path, params_template, train_template) -> tuple[PyTree, PyTree]:
    """A genclip_jax 0.1.0 step: one {"step", "params", "opt_state"} item, read without writing.

    Leaves the caller did not ask for are restored onto their stored shapes on one device."""
    with ocp.StandardCheckpointer() as reader:
        stored = reader.metadata(path).item_metadata.tree
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), stored
        )
        abstract[PARAMS] = _abstract(params_template)
        if train_template is not None:
            abstract["step"] = _abstract(train_template["step"])
            abstract["opt_state"] = _abstract(train_template["opt_state"])
        _check_shapes(stored[PARAMS], abstract[PARAMS], f"{path} (params)")
        if train_template is not None:
            _check_shapes(stored["opt_state"], abstract["opt_state"], f"{path} (opt_state)")
        restored = reader.restore(path, abstract)
    train_state = {"step": restored["step"], "opt_state": restored["opt_state"]}
    return restored[PARAMS], (train_state if train_template is not None else None)


def _params_checkpointer() -> ocp.Checkpointer:
    """Synchronous checkpointer for the ``params`` (+ optional ``config``) export layout."""
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(
            params=ocp.StandardCheckpointHandler(), config=ocp.JsonCheckpointHandler()
        )
    )


def save_params(
    directory: str | os.PathLike,
    params: PyTree,
    info: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Export a params-only checkpoint (no optimizer state), e.g. a converted or final model.

    `info` (JSON-serialisable: a config dict, conversion notes) is stored beside the params.
    Written completely into a hidden sibling directory, then renamed into place, so `directory`
    only ever holds a whole export. A non-empty `directory` is refused unless `overwrite`; then
    the old export is moved aside and deleted only after the swap.
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory; expected a directory path")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ValueError(
            f"{directory} is not empty; pass overwrite=True to replace it or pick a new directory"
        )
    items = {"params": ocp.args.StandardSave(params)}
    if info is not None:
        try:
            items["config"] = ocp.args.JsonSave(json.loads(json.dumps(dict(info))))
        except TypeError as e:
            raise ValueError(f"info must be JSON-serialisable to be stored: {e}") from e
    staging = directory.with_name(f".{directory.name}.incoming")
    with _params_checkpointer() as checkpointer:
        checkpointer.save(staging, args=ocp.args.Composite(**items), force=True)
    if jax.process_index() == 0:
        files.swap_directory(staging, directory)
    parallel.sync("genclip_jax.checkpoint.save_params")


def load_params(
    directory: str | os.PathLike, template: PyTree | None = None
) -> tuple[PyTree, dict[str, Any] | None]:
    """Read a `save_params` export: ``(params, info or None)``; writes nothing.

    Without `template` the params come back as nested dicts of arrays on the default device;
    with one, they take its structure, dtypes and shardings (shapes must match).
    """
    directory = pathlib.Path(directory).absolute()
    if not (directory / "params").is_dir():
        raise FileNotFoundError(
            f"{directory} is not a params export (expected {directory}/params written by "
            "genclip_jax.checkpoint.save_params)"
        )
    has_config = (directory / "config").is_dir()
    with _params_checkpointer() as checkpointer:
        if template is None:
            params_args = ocp.args.StandardRestore()
        else:
            abstract = _abstract(template)
            stored = checkpointer.metadata(directory).item_metadata["params"]
            _check_shapes(stored.tree, abstract, str(directory))
            params_args = ocp.args.StandardRestore(abstract)
        items = {"params": params_args}
        if has_config:
            items["config"] = ocp.args.JsonRestore()
        restored = checkpointer.restore(directory, args=ocp.args.Composite(**items))
    return restored["params"], (restored["config"] if has_config else None)
