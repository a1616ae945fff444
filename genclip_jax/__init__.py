"""genclip_jax: CLIP-based zero-shot anomaly detection (AnomalyCLIP, GenCLIP, WinCLIP) in JAX/Flax.

The public API is `__all__` below (its signatures are pinned by tests/test_public_api.py: a
change needs a new `__version__`); everything else is internal. Names load on first use, so
`import genclip_jax` and the command line stay fast.

    model = genclip_jax.load("runs/ac_visa")
    result = model.predict(images)           # result.anomaly_map (N, S, S), result.image_score
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.7.0"

# Public name -> "module:attribute" ("module" alone: the module itself).
_PUBLIC = {
    # Load and run a model.
    "load": "genclip_jax.api:load",
    "Model": "genclip_jax.api:Model",
    "Prediction": "genclip_jax.api:Prediction",
    # Run an exported artifact (`genclip-jax export`) with jax and numpy alone.
    "serving": "genclip_jax.serving",
    # Methods: the interface, the built-in ones, your own.
    "Method": "genclip_jax.methods:Method",
    "create_method": "genclip_jax.methods:create_method",
    "register_method": "genclip_jax.methods:register",
    # Configs, training and evaluation.
    "base_config": "genclip_jax.defaults:base_config",
    "validate_config": "genclip_jax.validate:validate",
    "train_and_evaluate": "genclip_jax.train_eval:train_and_evaluate",
    # The frozen CLIP.
    "CLIP": "genclip_jax.clip.model:CLIP",
    "CLIPConfig": "genclip_jax.clip.model:CLIPConfig",
    "load_backbone": "genclip_jax.backbone:load_backbone",
    # Pure functions: maps, losses, metrics.
    "maps": "genclip_jax.maps",
    "losses": "genclip_jax.losses",
    "metrics": "genclip_jax.metrics",
    # Datasets in the meta.json format.
    "read_meta": "genclip_jax.data.meta:read_meta",
    "write_meta": "genclip_jax.data.meta:write_meta",
    "make_meta": "genclip_jax.data.meta:make_meta",
    "split_entries": "genclip_jax.data.meta:split_entries",
    "write_synthetic_dataset": "genclip_jax.data.synthetic:write_synthetic_dataset",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'genclip_jax' has no attribute {name!r}")
    module, _, attribute = _PUBLIC[name].partition(":")
    value = importlib.import_module(module)
    return getattr(value, attribute) if attribute else value


def __dir__() -> list[str]:
    return sorted(__all__)
