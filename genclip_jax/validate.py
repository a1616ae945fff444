"""One check of a run config before any work: `validate(config, command)`.

Every command calls it before it reads data, loads weights or writes a file, so a bad value fails
in well under a second with nothing written, instead of after an epoch. Each error names the
field, the allowed values and the closest match. Two checks need more than the config and run as
soon as what they need is known: `check_backbone` (tap layers, patch size) once the backbone's
architecture is read and before anything is compiled, and `check_class_names` once a dataset's
meta.json is read.

The allowed values come from the modules that implement them, so a new choice is allowed here the
moment it exists there.
"""

from __future__ import annotations

import difflib
import math
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from genclip_jax import maps, metrics
from genclip_jax.clip.model import ARCHITECTURES, DTYPES, CLIPConfig
from genclip_jax.clip.vision import GLOBAL_MODES, HIDDEN_STREAMS
from genclip_jax.clip.weights import ACTIVATION_CHOICES
from genclip_jax.data.anomaly_synthesis import KINDS
from genclip_jax.data.meta import SPLITS
from genclip_jax.data.pipeline import MISSING_MASK_RULES
from genclip_jax.methods import METHODS, needs_training
from genclip_jax.methods.genclip import IMAGE_SCORES, IMAGE_TEXT_LAYERS
from genclip_jax.prompts import cnf
from genclip_jax.prompts.genclip import MVP_INITS, MVP_TARGETS

# Fields with a fixed set of values (the methods: `choices()`, as more can be registered).
CHOICES: dict[str, Sequence[str]] = {
    "model.global_mode": GLOBAL_MODES,
    "model.compute_dtype": tuple(DTYPES),
    "model.activation": ACTIVATION_CHOICES,
    "model.architecture": ("", *ARCHITECTURES),
    "anomalyclip.map_reduce": maps.MAP_REDUCTIONS,
    "genclip.map_reduce": maps.MAP_REDUCTIONS,
    "genclip.mvp_source": HIDDEN_STREAMS,
    "genclip.mvp_init": MVP_INITS,
    "genclip.mvp_target": MVP_TARGETS,
    "genclip.image_score": IMAGE_SCORES,
    "genclip.image_text_layer": IMAGE_TEXT_LAYERS,
    "genclip.cnf.rule": cnf.RULES,
    "eval.aupro_mode": metrics.AUPRO_MODES,
    "data.train_split": SPLITS,
    "data.test_split": SPLITS,
    "data.missing_mask": MISSING_MASK_RULES,
    "fewshot.split": SPLITS,
    "calibrate.policy": ("fpr", "f1"),
}
# Fields whose every element comes from a fixed set (no repeats, at least one).
LIST_CHOICES: dict[str, Sequence[str]] = {
    "eval.metrics": metrics.METRIC_NAMES, "train.synthetic_kinds": KINDS,
}
POSITIVE_INTS = (
    "model.image_size", "prompts.n_ctx", "genclip.state_len", "genclip.gqp_len",
    "train.epochs", "train.batch_size", "train.checkpoint_keep", "train.log_every_steps",
    "eval.batch_size", "parallel.initialization_timeout", "parallel.heartbeat_timeout",
    "calibrate.min_images", "fewshot.chunk_rows",
)
NON_NEGATIVE_INTS = (
    "model.dpam_start", "model.vision_heads", "model.text_heads", "prompts.deep_depth",
    "prompts.deep_length", "genclip.deep_depth", "genclip.deep_length", "data.prefetch",
    "eval.heatmaps_per_class", "eval.metric_size", "parallel.num_devices", "fewshot.k",
)
POSITIVE_FLOATS = (
    "train.lr", "train.eps", "anomalyclip.temperature", "genclip.temperature",
    "anomalyclip.sigma", "genclip.sigma", "winclip.temperature",
)
NON_NEGATIVE_FLOATS = (
    "prompts.init_std", "genclip.init_std", "anomalyclip.local_loss_weight",
    "genclip.image_loss_weight", "genclip.query_loss_weight", "calibrate.outlier_iqr",
    "fewshot.image_weight",
)
UNIT_INTERVAL = (  # [0, 1]
    "genclip.fusion_w", "genclip.image_score_mix", "train.synthetic_fraction",
    "calibrate.display_quantile", "calibrate.outlier_quantile", "fewshot.weight",
)
RATES = ("calibrate.image_fpr", "calibrate.pixel_fpr")  # (0, 1)
BETAS = ("train.b1", "train.b2")  # [0, 1)
LAYER_LISTS = {"anomalyclip": "anomalyclip.features_list", "genclip": "genclip.layers"}
TEMPLATES = (
    "prompts.normal_state", "prompts.abnormal_state", "genclip.normal_state",
    "genclip.abnormal_state", "genclip.cnf.template",
)
TEMPLATE_LISTS = ("winclip.templates", "winclip.normal_states", "winclip.anomalous_states")
# The methods with a few-shot path (`fewshot.k` > 0): WinCLIP+'s own, the `fewshot` add-on.
FEWSHOT_METHODS = ("winclip", "anomalyclip", "genclip")
COMMANDS = ("train", "eval", "predict", "ablate", "calibrate")
# Names a class may not have: the tables' mean row, and what would escape a heatmap folder.
RESERVED_CLASS_NAMES = (metrics.MEAN_ROW,)
_CLASS_NAME = re.compile(r"[^/\\\x00-\x1f]+")


def choices() -> dict[str, Sequence[str]]:
    """Every choice field with its allowed values, the registered methods included."""
    return {"method": tuple(METHODS), **CHOICES}


def get_field(config: ml_collections.ConfigDict, field: str) -> Any:
    """The value of a dotted field (`"genclip.cnf.rule"`)."""
    node = config
    for key in field.split("."):
        node = node[key]
    return node


def did_you_mean(value: object, allowed: Iterable[object]) -> str:
    """' (did you mean 'x'?)' for the closest allowed value (ignoring case), or ''."""
    by_lower = {str(a).lower(): a for a in allowed}
    match = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1, cutoff=0.5)
    return f" (did you mean {by_lower[match[0]]!r}?)" if match else ""


def _choice_error(field: str, value: object, allowed: Sequence[str]) -> str:
    return f"{field}: expected one of {list(allowed)}, got {value!r}{did_you_mean(value, allowed)}"


def _number_errors(config: ml_collections.ConfigDict) -> list[str]:
    errors = []

    def check(fields, ok, expected):
        for field in fields:
            value = get_field(config, field)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and ok(value)):
                errors.append(f"{field}: expected {expected}, got {value!r}")

    check(POSITIVE_INTS, lambda v: isinstance(v, int) and v > 0, "an integer >= 1")
    check(NON_NEGATIVE_INTS, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    check(POSITIVE_FLOATS, lambda v: v > 0, "a finite number > 0")
    check(NON_NEGATIVE_FLOATS, lambda v: v >= 0, "a finite number >= 0")
    check(UNIT_INTERVAL, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    check(BETAS, lambda v: 0 <= v < 1, "a number in [0, 1)")
    check(RATES, lambda v: 0 < v < 1, "a rate in (0, 1)")
    return errors


def _list_errors(config: ml_collections.ConfigDict) -> list[str]:
    errors = []
    for field, allowed in LIST_CHOICES.items():
        values = list(get_field(config, field))
        if not values:
            errors.append(f"{field}: expected at least one of {list(allowed)}, got none")
        errors += [_choice_error(f"{field}[{i}]", v, allowed)
                   for i, v in enumerate(values) if v not in allowed]
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            errors.append(f"{field}: expected each name once, got {repeated} repeated")
    kinds, weights = list(config.train.synthetic_kinds), list(config.train.synthetic_weights)
    if len(weights) != len(kinds) or not all(
        isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        for w in weights
    ) or not sum(weights):
        errors.append(f"train.synthetic_weights: expected {len(kinds)} numbers >= 0 with a "
                      f"positive sum, one per kind of train.synthetic_kinds {kinds}, got "
                      f"{weights!r}")
    for field in LAYER_LISTS.values():
        layers = list(get_field(config, field))
        if not layers or not all(isinstance(x, int) and x >= 1 for x in layers):
            errors.append(f"{field}: expected 1-indexed layer numbers (integers >= 1), "
                          f"got {layers!r}")
        elif len(set(layers)) != len(layers):
            errors.append(f"{field}: expected each layer once, got {layers!r}")
    return errors


def _template_errors(config: ml_collections.ConfigDict) -> list[str]:
    errors = [
        f"{field}: expected a template with one '{{}}' for the class word, got {value!r}"
        for field in TEMPLATES
        if (value := get_field(config, field)).count("{}") != 1
    ]
    # An older config's "a photo of a {}." would read "a photo of a an object." now.
    if re.search(r"\b(a|an) \{\}", template := config.genclip.cnf.template):
        errors.append("genclip.cnf.template: '{}' takes the word with its article ('an object'); "
                      f"expected no article before it, got {template!r}")
    for field in TEMPLATE_LISTS:
        values = list(get_field(config, field))
        if not values:
            errors.append(f"{field}: expected at least one template, got none")
        errors += [f"{field}[{i}]: expected a template with one '{{}}', got {v!r}"
                   for i, v in enumerate(values) if not isinstance(v, str) or v.count("{}") != 1]
    return errors


def _winclip_errors(config: ml_collections.ConfigDict, command: str) -> list[str]:
    """WinCLIP's scales, and a training-free method asked to train."""
    errors = []
    scales = list(config.winclip.scales)
    if not scales or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                             for s in scales) or len(set(scales)) != len(scales):
        errors.append(f"winclip.scales: expected distinct window sides in patches (integers "
                      f">= 1), got {scales!r}")
    if command == "train" and config.method in METHODS and not needs_training(config.method):
        errors.append(f"method: {config.method!r} needs no training (it learns nothing): run "
                      "`genclip-jax eval` or `predict` with this config directly")
    return errors


def _fewshot_errors(config: ml_collections.ConfigDict, command: str) -> list[str]:
    """A method without a few-shot path, layers its features lack, and references that are
    missing or would be the test images themselves."""
    fs, errors = config.fewshot, []
    layers = list(fs.layers)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers) or len(
            set(layers)) != len(layers):
        errors.append(f"fewshot.layers: expected distinct layer numbers, got {layers!r}")
    elif (field := LAYER_LISTS.get(config.method)) and (
            beyond := [x for x in layers if x not in get_field(config, field)]):
        errors.append(f"fewshot.layers: {beyond} are not among {field}="
                      f"{list(get_field(config, field))}, the layers whose patch tokens the "
                      "method computes (empty: all of them)")
    elif layers and config.method == "winclip":
        errors.append(f"fewshot.layers: WinCLIP+ compares the patch and window embeddings of its "
                      f"last layer, not layers; leave it empty (got {layers!r})")
    if not fs.k:
        return errors
    if config.method not in FEWSHOT_METHODS:
        errors.append(f"fewshot.k: method {config.method!r} has no few-shot path (methods with "
                      f"one: {list(FEWSHOT_METHODS)}); set fewshot.k=0")
    if command not in ("eval", "predict", "calibrate"):
        return errors
    reference = fs.reference or (config.data.test_root if command == "eval" else "")
    if not reference or not pathlib.Path(reference).is_dir():
        errors.append(f"fewshot.reference: fewshot.k={fs.k} needs a folder of normal reference "
                      "images: a dataset root with meta.json, a good/defect folder or a folder "
                      f"of class folders, got {fs.reference!r}")
    elif (command == "eval" and fs.split == config.data.test_split
          and pathlib.Path(reference).resolve() == pathlib.Path(config.data.test_root).resolve()):
        errors.append(f"fewshot.split: the references would be the test images themselves "
                      f"(split {fs.split!r} of {config.data.test_root}); take them from another "
                      "split (fewshot.split=train) or another folder (fewshot.reference)")
    return errors


def _path_errors(config: ml_collections.ConfigDict, command: str) -> list[str]:
    """Roots a command reads must hold a meta.json; a params export must exist."""
    errors = []
    roots = {"train": ["data.train_root"], "ablate": ["data.train_root", "data.test_root"],
             "eval": ["data.test_root"]}.get(command, [])
    if command == "train" and config.data.test_root:
        roots.append("data.test_root")  # evaluated after training: fail now, not then
    for field in roots:
        root = get_field(config, field)
        if not root:
            errors.append(f"{field}: set the root of the {field.split('_')[0][5:]} dataset "
                          "(a folder with meta.json)")
        elif not (pathlib.Path(root) / "meta.json").is_file():
            errors.append(f"{field}: expected a dataset folder holding meta.json, but "
                          f"{pathlib.Path(root) / 'meta.json'} does not exist (write it with "
                          "`genclip-jax make-meta`)")
    if command in ("eval", "predict") and config.eval.params and not (
        pathlib.Path(config.eval.params) / "params"
    ).is_dir():
        errors.append(f"eval.params: expected a params export (the output of `genclip-jax "
                      f"convert`), got {config.eval.params!r} with no params/ folder")
    return errors


def validate(config: ml_collections.ConfigDict, command: str) -> None:
    """Checks every field of `config` that `command` relies on; raises one ValueError listing
    every problem found. Reads nothing but the file system's directory entries; writes nothing."""
    if command not in COMMANDS:
        raise ValueError(f"validate: command must be one of {COMMANDS}, got {command!r}")
    errors = [_choice_error(field, get_field(config, field), allowed)
              for field, allowed in choices().items() if get_field(config, field) not in allowed]
    errors += _number_errors(config)
    errors += _list_errors(config)
    errors += _template_errors(config)
    errors += _winclip_errors(config, command)
    errors += _fewshot_errors(config, command)
    if config.method == "anomalyclip" and config.prompts.deep_depth > 1 and (
        config.prompts.deep_length < 1
    ):
        errors.append("prompts.deep_length: expected >= 1 with prompts.deep_depth > 1, got "
                      f"{config.prompts.deep_length}")
    errors += _path_errors(config, command)
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def check_backbone(config: ml_collections.ConfigDict, clip: CLIPConfig) -> None:
    """The checks that need the backbone's architecture; run before anything is compiled."""
    source = f"the backbone model.clip={config.model.clip!r}"
    errors = []
    patch, size = clip.vision_patch_size, config.model.image_size
    if size % patch or size < patch:
        lower, upper = max(patch, size // patch * patch), (size // patch + 1) * patch
        errors.append(f"model.image_size: expected a multiple of the patch size {patch} of "
                      f"{source}, got {size} (nearest: {lower} or {upper})")
    layers_field = LAYER_LISTS.get(config.method)
    if layers_field:
        beyond = [x for x in get_field(config, layers_field) if x > clip.vision_layers]
        if beyond:
            errors.append(f"{layers_field}: layers {beyond} are beyond the "
                          f"{clip.vision_layers} vision layers of {source}")
    if config.method == "winclip" and not errors:
        grid = size // patch
        too_big = [s for s in config.winclip.scales if s > grid]
        if too_big:
            errors.append(f"winclip.scales: windows of {too_big} patches do not fit the "
                          f"{grid}x{grid} patch grid of model.image_size={size} with {source}")
    if config.model.dpam_start > clip.vision_layers:
        errors.append(f"model.dpam_start: expected 0 (off) or 1..{clip.vision_layers} for "
                      f"{source}, got {config.model.dpam_start}")
    depth_field = "prompts.deep_depth" if config.method == "anomalyclip" else "genclip.deep_depth"
    if get_field(config, depth_field) > clip.text_layers:
        errors.append(f"{depth_field}: expected at most the {clip.text_layers} text layers of "
                      f"{source}, got {get_field(config, depth_field)}")
    if errors:
        raise ValueError("config does not fit the backbone:\n  " + "\n  ".join(errors))


def check_class_names(names: Iterable[str], source: str) -> None:
    """Class names become table rows and heatmap folders: refuse the reserved and the unsafe."""
    for name in dict.fromkeys(names):
        if name in RESERVED_CLASS_NAMES:
            raise ValueError(f"{source}: class {name!r} is reserved for the tables' mean row; "
                             "rename the class in meta.json")
        if not _CLASS_NAME.fullmatch(name) or name in (".", "..") or name != name.strip():
            raise ValueError(f"{source}: class name {name!r} cannot name a table row and a "
                             "folder; expected a non-empty name without '/', '\\', control "
                             "characters or surrounding spaces")
