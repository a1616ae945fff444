"""A run directory: what each command may write in it, and which config fields a run pins.

    RUN/config.json        the run's config: written by `train` only, once every check passed
    RUN/checkpoints/       Orbax checkpoints (`checkpoint.Checkpointer`): `train` only
    RUN/logs/              TensorBoard events of `train`
    RUN/eval/<target>/     default output of `eval`: one folder per test root, replaced whole
    RUN/predict/           default output of `predict`
    RUN/calibration.json   thresholds of `calibrate` (its only file; atomic)

`eval` and `predict` only read a run (checkpoints through a read-only Orbax manager) and write
their own output folder, so they work beside a live training and, given `--out`, on a read-only
model folder.

Which config fields must agree with a run's is decided here and nowhere else: `MODEL_FIELDS`
define what the checkpointed prompts mean (every reader checks them), `TRAINING_FIELDS` also bind
a resumed training. No other field ever counts (data roots of other sets, batch sizes, eval,
output, parallelism, logging).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from flax import traverse_util

from genclip_jax import defaults, files, parallel

# A listed name covers the field itself and every field below it.
MODEL_FIELDS: tuple[str, ...] = (
    "method",
    # The frozen backbone and how its features are taken.
    "model.clip", "model.random_arch", "model.random_seed", "model.npz_prefix",
    "model.vision_heads", "model.text_heads", "model.dpam_start", "model.global_mode",
    "model.activation", "model.architecture",
    # Prompt shapes and the text they are embedded in.
    "prompts.n_ctx", "prompts.deep_depth", "prompts.deep_length", "prompts.fp16_deep_prompts",
    "prompts.class_word", "prompts.normal_state", "prompts.abnormal_state",
    "anomalyclip.temperature",
    "genclip.layers", "genclip.state_len", "genclip.gqp_len", "genclip.use_mvp",
    "genclip.mvp_source", "genclip.mvp_bias", "genclip.mvp_target", "genclip.normal_state",
    "genclip.abnormal_state", "genclip.deep_depth", "genclip.deep_length",
    "genclip.fp16_deep_prompts", "genclip.temperature", "genclip.image_text_layer",
    # Training-free methods: their fixed prompts and windows.
    "winclip",
)
TRAINING_FIELDS: tuple[str, ...] = (
    "data.train_root", "data.train_split", "data.train_classes", "data.missing_mask",
    "model.image_size",
    "train.batch_size", "train.lr", "train.b1", "train.b2", "train.eps", "train.seed",
    "train.shuffle", "train.synthetic_anomalies", "train.synthetic_fraction",
    "train.synthetic_kinds", "train.synthetic_weights",
    "prompts.init_std", "genclip.init_std", "genclip.mvp_init",
    "anomalyclip.features_list", "anomalyclip.local_loss_weight",
    "genclip.image_loss_weight", "genclip.query_loss_weight",
)

# What a model's scores depend on besides its checkpoint: every model and inference knob.
SCORE_FIELDS: tuple[str, ...] = (
    *MODEL_FIELDS, "model", "prompts", "anomalyclip", "genclip", "eval.params", "fewshot",
)

_ABSENT = "<absent>"


def config_to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """JSON-normalised plain dict of a config (tuples become lists), as stored in config.json."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config)))


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree), sep=".")


def config_hash(config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    """A short digest of the `SCORE_FIELDS` of `config`: equal hashes give the same scores, so
    thresholds calibrated under one hold under the other."""
    fields = {k: v for k, v in sorted(_flat(config_to_dict(config)).items())
              if _covered(k, SCORE_FIELDS)}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _covered(name: str, fields: Sequence[str]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fields)


def config_differences(
    old: Mapping[str, Any], new: Mapping[str, Any], fields: Sequence[str]
) -> dict[str, tuple[Any, Any]]:
    """The `fields` (and fields below them) whose values differ: ``{name: (old, new)}``.

    A field missing from `old` (a run written before the field existed) takes its default; one
    missing on either side after that reads ``"<absent>"``.
    """
    flat_old = {**_flat(config_to_dict(defaults.base_config())), **_flat(old)}
    flat_new = _flat(new)
    diffs = {}
    for name in sorted(flat_old.keys() | flat_new.keys()):
        if _covered(name, fields):
            before, after = flat_old.get(name, _ABSENT), flat_new.get(name, _ABSENT)
            if before != after:
                diffs[name] = (before, after)
    return diffs


class RunDir:
    """Paths of a run and the rules of who writes them (see the module docstring)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = pathlib.Path(path).absolute()
        self.config_path = self.path / "config.json"
        self.checkpoints = self.path / "checkpoints"

    def saved_config(self) -> dict[str, Any] | None:
        """The run's config.json, or None when there is none."""
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.config_path}: not a valid JSON config ({err})") from err

    def has_checkpoint(self) -> bool:
        """Whether a complete checkpoint step exists (Orbax's temporary folders do not count)."""
        return self.checkpoints.is_dir() and any(
            p.name.isdigit() and p.is_dir() for p in self.checkpoints.iterdir()
        )

    def check_compatible(
        self, config: ml_collections.ConfigDict, fields: Sequence[str], action: str
    ) -> None:
        """ValueError listing the `fields` on which `config` and the run's config.json differ."""
        saved = self.saved_config()
        if saved is None:
            return
        diffs = config_differences(saved, config_to_dict(config), fields)
        if diffs:
            lines = "\n".join(f"  {k}: {a!r} (run) vs {b!r} (now)" for k, (a, b) in diffs.items())
            raise ValueError(
                f"cannot {action}: {self.path} holds a run whose config ({self.config_path}) "
                f"differs in fields that define it:\n{lines}\nUse the run's values, or a new "
                "workdir for a new run."
            )

    def check_resumable(self, config: ml_collections.ConfigDict) -> None:
        """Before training into this run: a run with a checkpoint must have the same model and
        training recipe; a config.json without any checkpoint (a run that failed before its first
        save) is no run yet, and the new config replaces it."""
        if self.has_checkpoint():
            self.check_compatible(config, MODEL_FIELDS + TRAINING_FIELDS, "resume training")
        elif self.config_path.exists():
            logging.info("%s has no checkpoint yet: starting the run afresh with this config",
                         self.path)

    def check_readable(
        self, config: ml_collections.ConfigDict, unpinned: Sequence[str] = ()
    ) -> None:
        """Before evaluating this run's checkpoint: it exists and defines the same model (but
        for the `unpinned` fields the caller changed on purpose, e.g. the same backbone's weights
        read from another place)."""
        if not self.has_checkpoint():
            raise FileNotFoundError(
                f"no checkpoint in {self.checkpoints}: train first, or set eval.params to a "
                "params export (e.g. the output of `genclip-jax convert`)"
            )
        fields = [f for f in MODEL_FIELDS if f not in unpinned]
        self.check_compatible(config, fields, "evaluate this run")

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        """Records the config of the training about to run (process 0; `train` only)."""
        if jax.process_index() == 0:
            text = json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n"
            files.write_atomic(self.config_path, text)

    def eval_dir(self, test_root: str, label: str = "") -> pathlib.Path:
        """Default output of evaluating on `test_root`: one folder per target set (and few-shot
        `label`, so a k-shot evaluation never replaces the zero-shot one)."""
        name = pathlib.Path(test_root).absolute().name
        return self.path / "eval" / (f"{name}_{label}" if label else name)

    def predict_dir(self) -> pathlib.Path:
        return self.path / "predict"


@contextlib.contextmanager
def staged_output(final: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields an empty staging folder beside `final`; once the block succeeds it replaces
    `final` as a whole (a failed block leaves `final` as it was).

    `final` must have passed `files.check_replaceable`. Multi-host: all processes enter; process
    0 creates, swaps and cleans up, the others may write into the staging folder in between
    (a filesystem all processes see).
    """
    staging = final.with_name(f".{final.name}.incoming")
    lead = jax.process_index() == 0
    if lead:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / files.OUTPUT_MARKER).write_text("written by genclip-jax; replaced as a whole\n")
    parallel.sync("genclip_jax.staged_output.created")
    try:
        yield staging
        parallel.sync("genclip_jax.staged_output.written")
        if lead:
            files.swap_directory(staging, final)
    finally:
        if lead:
            shutil.rmtree(staging, ignore_errors=True)
