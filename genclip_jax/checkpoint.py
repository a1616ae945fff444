"""Training checkpoints (Orbax) with the run config beside them, and params-only exports.

Layout of a training workdir::

    workdir/config.json           the run config (written by process 0, atomically)
    workdir/checkpoints/<step>/   one Orbax checkpoint per saved step, the last `keep` kept

Orbax writes each step into ``<step>.orbax-checkpoint-tmp-<time>`` and renames it when complete,
so an interrupted save never shows up as a step; its leftovers are removed when the next
`Checkpointer` opens the workdir.

Multi-host: every process must call `Checkpointer(...)`, `save`, `restore`, `save_params` and
`load_params` (Orbax coordinates the processes and writes each array shard from its owner); only
process 0 writes `config.json` and renames directories. Paths must be on a filesystem all
processes see; `config.json` and `save_params` use local POSIX renames.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from genclip_jax.files import write_atomic

PyTree = Any
ConfigLike = ml_collections.ConfigDict | Mapping[str, Any]

# Dotted config fields (fnmatch patterns; `*` also matches dots) that may differ between the run
# that wrote a workdir and a run resuming from it: they change how long, where (devices, hosts),
# how fast (feature cache, prefetch) or how visibly we train, or what we evaluate on, not what
# the checkpointed arrays mean.
DEFAULT_MUTABLE_FIELDS: tuple[str, ...] = (
    "workdir",
    "train.epochs",
    "train.cache_features",
    "parallel.*",
    "data.prefetch",
    "data.test_*",
    "eval.*",
    "logging.*",
    "progress.*",
    "*log_every*",
    "*checkpoint_every*",
    "*progress*",
)

_ABSENT = "<absent>"
_DEFAULT_ITEM = "default"  # Orbax's item name (and subdirectory) for a single-item manager


def config_to_dict(config: ConfigLike) -> dict[str, Any]:
    """JSON-normalised plain dict of a config, so that saved and live configs compare equal."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    try:
        return json.loads(json.dumps(dict(config)))
    except TypeError as e:
        raise ValueError(f"config must be JSON-serialisable to be stored: {e}") from e


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    mutable_fields: Iterable[str] = DEFAULT_MUTABLE_FIELDS,
) -> dict[str, tuple[Any, Any]]:
    """Model-defining fields that differ, as ``{dotted_name: (old, new)}``.

    Fields matching a `mutable_fields` pattern are ignored; a field present on one side only
    counts as a difference (its missing side is ``"<absent>"``).
    """
    patterns = tuple(mutable_fields)
    flat_old, flat_new = _flatten(old), _flatten(new)
    diffs = {}
    for name in sorted(flat_old.keys() | flat_new.keys()):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        before, after = flat_old.get(name, _ABSENT), flat_new.get(name, _ABSENT)
        if before != after:
            diffs[name] = (before, after)
    return diffs


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """``{dotted.leaf.path: shape}``; dotted paths match Orbax's names for the same leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        ".".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()))
        for path, leaf in leaves
    }


def _check_shapes(stored_tree: PyTree, abstract: PyTree, where: str) -> None:
    """Refuse a restore whose template disagrees with the stored leaves (another config)."""
    stored, wanted = _leaf_shapes(stored_tree), _leaf_shapes(abstract)
    problems = [
        f"{name}: checkpoint {stored[name]} vs template {wanted[name]}"
        for name in sorted(stored.keys() & wanted.keys())
        if stored[name] != wanted[name]
    ]
    problems += [f"{name}: missing in checkpoint" for name in sorted(wanted.keys() - stored.keys())]
    problems += [f"{name}: not in template" for name in sorted(stored.keys() - wanted.keys())]
    if problems:
        raise ValueError(
            f"checkpoint {where} does not match the restore template (was it written with "
            f"another config?): " + "; ".join(problems)
        )


def _abstract(template: PyTree) -> PyTree:
    """Shape/dtype/sharding of each leaf: Orbax restores onto exactly these (sharded if given)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, template)


class Checkpointer:
    """Keep-last-N Orbax checkpoints of a training state under ``workdir/checkpoints``.

    Opening a workdir checks that its `config.json` (if any) defines the same model as `config`
    (see `check_compatible`), then records `config` there, so a resumed run cannot silently
    continue from arrays trained under another config.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        config: ConfigLike,
        *,
        keep: int = 3,
        save_interval_steps: int = 1,
        mutable_fields: Iterable[str] = DEFAULT_MUTABLE_FIELDS,
    ) -> None:
        if keep < 1 or save_interval_steps < 1:
            raise ValueError(
                f"keep and save_interval_steps must be >= 1, got {keep} and {save_interval_steps}"
            )
        self.workdir = pathlib.Path(workdir).absolute()
        self.config_path = self.workdir / "config.json"
        self.mutable_fields = tuple(mutable_fields)
        self.check_compatible(config)
        _sync("genclip_jax.checkpoint.config_checked")
        if jax.process_index() == 0:
            self.workdir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n"
            write_atomic(self.config_path, text)
        # Registering the handler up front lets a fresh manager read the metadata of checkpoints
        # written by an earlier run (needed for the shape check before the first restore).
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(_DEFAULT_ITEM, ocp.args.StandardSave)
        registry.add(_DEFAULT_ITEM, ocp.args.StandardRestore)
        self._manager = ocp.CheckpointManager(
            self.workdir / "checkpoints",
            handler_registry=registry,
            options=ocp.CheckpointManagerOptions(
                # Every `save_interval_steps`, on preemption notice, or when forced; unlike
                # Orbax's default, no extra save of whatever step comes first.
                save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
                    [
                        ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
                    ]
                ),
                preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
                create=True,
                cleanup_tmp_directories=True,
            ),
        )

    def check_compatible(self, config: ConfigLike) -> None:
        """Raise ValueError if the workdir's `config.json` defines a different model."""
        if not self.config_path.exists():
            return
        try:
            old = json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.config_path} is not valid JSON: {e}") from e
        diffs = config_differences(old, config_to_dict(config), self.mutable_fields)
        if diffs:
            lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items())
            raise ValueError(
                f"workdir {self.workdir} holds a run with a different config "
                f"({self.config_path}); model-defining fields differ (old -> new):\n{lines}\n"
                "Use a new workdir for a new config (only fields matching "
                f"{list(self.mutable_fields)} may change when resuming)."
            )

    def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
        """Save `state` at `step` (asynchronously); returns whether a save was started.

        Skipped when `step` is off the save interval (unless `force`) or when a checkpoint at
        `step` or later already exists, so a final save after a periodic one is harmless.
        """
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            return False
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def wait(self) -> None:
        """Block until pending async saves are on disk (before exiting or reading them)."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """Newest checkpoint step (on disk once `wait` returns), or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints kept, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, template: PyTree, step: int | None = None) -> PyTree:
        """Restore `step` (default: latest) onto `template`'s structure, dtypes and shardings.

        `template` may hold concrete arrays or `jax.ShapeDtypeStruct`s (e.g. from
        `jax.eval_shape`); leaves with a `sharding` come back as global arrays laid out that way.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no checkpoint to restore under {self.workdir}/checkpoints"
                )
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} under {self.workdir}/checkpoints; "
                f"available steps: {self.all_steps()}"
            )
        abstract = _abstract(template)
        stored = self._manager.metadata(step).item_metadata
        _check_shapes(stored.tree, abstract, f"{self.workdir}/checkpoints/{step}")
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        """Wait for pending saves and release Orbax's background resources."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
    config_dict: ConfigLike | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Export a params-only checkpoint (no optimizer state), e.g. a converted or final model.

    Written completely into a hidden sibling directory, then renamed into place, so
    `directory` only ever holds a whole export. A non-empty `directory` is refused unless
    `overwrite`; then the old export is moved aside and deleted only after the swap.
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} exists and is not a directory; expected a directory path")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ValueError(
            f"{directory} is not empty; pass overwrite=True to replace it or pick a new directory"
        )
    items = {"params": ocp.args.StandardSave(params)}
    if config_dict is not None:
        items["config"] = ocp.args.JsonSave(config_to_dict(config_dict))
    staging = directory.with_name(f".{directory.name}.incoming")
    with _params_checkpointer() as checkpointer:
        checkpointer.save(staging, args=ocp.args.Composite(**items), force=True)
    if jax.process_index() == 0:
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    _sync("genclip_jax.checkpoint.save_params")


def load_params(
    directory: str | os.PathLike, template: PyTree | None = None
) -> tuple[PyTree, dict[str, Any] | None]:
    """Read a `save_params` export: ``(params, config_dict or None)``.

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
