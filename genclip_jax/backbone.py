"""The frozen CLIP backbone of a run, built from `config.model`."""

from __future__ import annotations

import ml_collections

from genclip_jax.clip import weights
from genclip_jax.clip.model import CLIPConfig, init_params

_SWITCHES = ("dpam_start", "global_mode", "compute_dtype")


def load_backbone(model_cfg: ml_collections.ConfigDict) -> tuple[CLIPConfig, dict]:
    """(architecture, params): loaded from `model.clip`, or random for `model.clip == "random"`."""
    switches = {name: model_cfg[name] for name in _SWITCHES}
    if model_cfg.clip == "random":
        config = CLIPConfig(**model_cfg.random_arch.to_dict(), **switches)
        return config, init_params(config, model_cfg.random_seed)
    return weights.load(
        model_cfg.clip,
        vision_heads=model_cfg.vision_heads,
        text_heads=model_cfg.text_heads,
        npz_prefix=model_cfg.npz_prefix,
        **switches,
    )
