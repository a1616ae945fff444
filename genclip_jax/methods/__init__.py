"""Anomaly-detection methods behind one interface, `Method`.

`create_method(config, clip_config)` builds the method `config.method` names; `register` adds one
defined outside the package (examples/custom_method.py), which train, evaluate, predict and the
Python API then run like the built-in ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import ml_collections
import numpy as np

from genclip_jax.clip.model import CLIPConfig
from genclip_jax.clip.vision import VisionFeatures
from genclip_jax.methods.anomalyclip import AnomalyCLIP
from genclip_jax.methods.genclip import GenCLIP
from genclip_jax.methods.winclip import WinCLIP

PyTree = Any
Adaptation = Mapping[str, Any]
"""What `prepare_eval` returns: {class name: decision}, each decision a dataclass (evaluation
logs it and saves its non-array fields as class_names.json: GenCLIP's CNF decisions; WinCLIP's
per-class text embeddings and references stay out); {} for a method that does not adapt."""


@runtime_checkable
class Method(Protocol):
    """What train, evaluate, predict and `genclip_jax.load` need of a method.

    The frozen vision forward (`encode_images`) is apart from what uses the learnable params
    (`loss`, `predict`), so training can cache its output. Every array argument of the jitted
    calls is a global batch: images (B, S, S, 3) uint8 pixels (the vision tower normalises them:
    `clip.preprocess.model_input`) or CLIP-normalised floats, `batch` the numeric fields of a host
    batch (mask (B, S, S): bool, float32 in `loss`; label (B,), valid (B,), plus `host_inputs`).
    A method holds no state beyond its config: what evaluation adapts is returned, and passed back
    in. Jitted steps take the method as a static argument, so methods that compare equal must
    compute the same (the built-in ones compare by config, `methods.config_key`; by default, by
    identity).
    """

    name: str
    needs_class_name: bool  # its prompts name the class: inference needs one (or the generic)

    def init(self, rng: jax.Array) -> PyTree:
        """The learnable params; an empty dict for a method with nothing to train."""

    def host_inputs(
        self, batch: dict, adaptation: Adaptation | None = None
    ) -> dict[str, np.ndarray]:
        """Numeric arrays the device step needs from the batch's metadata (`cls_name`, ...),
        under `prepare_eval`'s `adaptation` (None: the classes as named, as in training)."""

    def encode_images(self, clip_params: PyTree, images: jax.Array) -> VisionFeatures:
        """Frozen vision features (no gradient): what `loss` and `predict` take."""

    def class_image_features(self, clip_params: PyTree, images: jax.Array) -> jax.Array:
        """(B, D) image embeddings for test-time adaptation (see `prepare_eval`)."""

    def prepare_eval(
        self, clip_params: PyTree, class_names: list[str],
        class_features: Callable[[str], np.ndarray],
    ) -> Adaptation:
        """The adaptation to the test classes (`class_features(name)`: that class's (N, D)
        `class_image_features`, computed only if asked for), for `host_inputs`."""

    def loss(
        self, params: PyTree, clip_params: PyTree, feats: VisionFeatures, batch: dict
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(total, parts); parts hold at least "total", "local" (pixel) and "ce" (image)."""

    def predict(
        self, params: PyTree, clip_params: PyTree, feats: VisionFeatures, batch: dict
    ) -> dict[str, jax.Array]:
        """{"anomaly_map": (B, S, S), "image_score": (B,)}."""

    def text_features(
        self, params: PyTree, clip_params: PyTree, class_name: str | None = None
    ) -> jax.Array:
        """(2, D) unnormalised [normal, abnormal] text features, for `class_name` where the
        method's prompts name the class (None: its generic word)."""

    def shape_hints(self, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """The config fields that stored param shapes {leaf: shape} contradict, as
        "field=implied value (config: value)", for restore errors."""


MethodFactory = Callable[[ml_collections.ConfigDict, CLIPConfig], Method]
METHODS: dict[str, MethodFactory] = {
    "anomalyclip": AnomalyCLIP, "genclip": GenCLIP, "winclip": WinCLIP,
}


def needs_training(name: str) -> bool:
    """Whether the registered method `name` learns params. A method class with nothing to
    learn says so with a class attribute `needs_training = False` (WinCLIP): `train` refuses it,
    and `eval` / `predict` run it without a checkpoint."""
    return bool(getattr(METHODS[name], "needs_training", True))


def register(name: str, factory: MethodFactory) -> None:
    """Makes `config.method = name` build `factory(config, clip_config)` everywhere."""
    if name in METHODS and METHODS[name] is not factory:
        raise ValueError(f"method {name!r} is already registered ({METHODS[name]})")
    METHODS[name] = factory


def create_method(config: ml_collections.ConfigDict, clip_config: CLIPConfig) -> Method:
    """The method named by `config.method`, built for this backbone."""
    if config.method not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {config.method!r}")
    return METHODS[config.method](config, clip_config)
