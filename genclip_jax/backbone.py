"""The frozen CLIP backbone of a run, built from `config.model`."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from genclip_jax.clip import weights
from genclip_jax.clip.model import ARCHITECTURES, CLIPConfig, init_params

_SWITCHES = ("dpam_start", "global_mode", "compute_dtype")


def load_backbone(
    model_cfg: ml_collections.ConfigDict, check: Callable[[CLIPConfig], None] | None = None
) -> tuple[CLIPConfig, dict]:
    """(architecture, params): loaded from `model.clip`, or random for `model.clip == "random"`
    (of `model.architecture` when it names one, else of `model.random_arch`).

    `check` sees the architecture before any parameter is built or converted (the random
    backbone's initialisation compiles, a real one is read from disk), so a config that does not
    fit the backbone fails before that work.
    """
    switches = {name: model_cfg[name] for name in _SWITCHES}
    if model_cfg.clip == "random":
        # The named architecture (`model.architecture`) at full size, else `model.random_arch`.
        named = ARCHITECTURES.get(model_cfg.architecture)
        config = named or CLIPConfig(**model_cfg.random_arch.to_dict())
        if model_cfg.activation != "auto":
            config = config.replace(activation=model_cfg.activation)
        config = config.replace(**switches)
        if check is not None:
            check(config)
        return config, init_params(config, model_cfg.random_seed)
    config, params = weights.load(
        model_cfg.clip,
        vision_heads=model_cfg.vision_heads,
        text_heads=model_cfg.text_heads,
        npz_prefix=model_cfg.npz_prefix,
        activation=model_cfg.activation,
        architecture=model_cfg.architecture,
        **switches,
    )
    if check is not None:
        check(config)
    return config, params
