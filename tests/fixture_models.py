"""Builds our model from a golden fixture's sidecar, so any fixture of the schema is checked."""

from __future__ import annotations

import functools
import pathlib

import numpy as np
from fixtures import load_sidecar

from genclip_jax import defaults
from genclip_jax.backbone import load_backbone
from genclip_jax.methods.anomalyclip import AnomalyCLIP


def assert_close(got, ref, name: str, rel: float = 1e-4) -> None:
    """max |got - ref| <= rel * max(1, max |ref|): the parity tolerance of the issues."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    bound = rel * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def fixture_config(npz_path: pathlib.Path, features_key: str = "fl24"):
    """The run config that reproduces a fixture's reference run."""
    side = load_sidecar(npz_path)
    ref = side["config"]
    details = ref["design_details"]
    c = defaults.base_config()
    c.model.clip = str(npz_path)
    c.model.npz_prefix = "sd."
    c.model.vision_heads = ref["vision_heads"]
    c.model.text_heads = ref["text_heads"]
    # DAPM_replace(DPAM_layer) swaps the last DPAM_layer - 1 blocks.
    c.model.dpam_start = ref["vision_layers"] - (ref["DPAM_layer"] - 1) + 1
    c.model.image_size = ref["input_size"]
    c.prompts.n_ctx = details["Prompt_length"]
    c.prompts.deep_depth = details["learnabel_text_embedding_depth"]
    c.prompts.deep_length = details["learnabel_text_embedding_length"]
    c.anomalyclip.features_list = list(ref["features_lists"][features_key])
    c.anomalyclip.temperature = ref["temperature"]
    c.anomalyclip.sigma = float(ref["gaussian_sigma"])
    c.anomalyclip.local_loss_weight = float(ref["loss_lambda"])
    return c


@functools.lru_cache(maxsize=4)
def fixture_method(npz_path: pathlib.Path, features_key: str = "fl24"):
    """(method, clip params) for a fixture and one of its features lists."""
    config = fixture_config(npz_path, features_key)
    clip_config, clip_params = load_backbone(config.model)
    return AnomalyCLIP(config, clip_config), clip_params


def prompt_params(ref: dict) -> dict:
    """The fixture's prompt-learner parameters in our layout."""
    n_deep = len([k for k in ref if k.startswith("pl.compound_prompts_text.")])
    return {
        "ctx_pos": ref["pl.ctx_pos"].reshape(-1, ref["pl.ctx_pos"].shape[-1]),
        "ctx_neg": ref["pl.ctx_neg"].reshape(-1, ref["pl.ctx_neg"].shape[-1]),
        "deep_prompts": np.stack([ref[f"pl.compound_prompts_text.{i}"] for i in range(n_deep)]),
    }
