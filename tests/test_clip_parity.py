"""Parity of the Flax CLIP (vision with DPAM, text with deep prompts) with the official code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixture_models import assert_close, fixture_method, prompt_params
from fixtures import load_fixture, load_sidecar, parametrize_fixtures

from genclip_jax.clip.model import CLIP
from genclip_jax.clip.vision import resize_positional_embedding


def _encode(method, clip_params, images, layers):
    fn = jax.jit(
        lambda p, x: method.clip.apply({"params": p}, x, layers, method=CLIP.encode_image)
    )
    return fn(clip_params, images)


@parametrize_fixtures
def test_positional_embedding_resize(fixture_path):
    ref = load_fixture(fixture_path)
    _, clip_params = fixture_method(fixture_path)
    side = load_sidecar(fixture_path)["config"]["grid_run"]
    got = resize_positional_embedding(clip_params["visual"]["positional_embedding"], (side, side))
    assert_close(got, ref["aux.visual_positional_embedding_resized"], "pos-emb resize")


@parametrize_fixtures
def test_vision_features(fixture_path):
    ref = load_fixture(fixture_path)
    lists = load_sidecar(fixture_path)["config"]["features_lists"]
    method, clip_params = fixture_method(fixture_path)
    for key, layers in lists.items():
        out = _encode(method, clip_params, ref["input.images_nhwc"], tuple(layers))
        assert_close(out.global_feature, ref["out.global_image_feature"], "global feature")
        assert_close(out.patch_tokens, ref[f"out.{key}.patch_tokens"], f"{key} patch tokens")


@parametrize_fixtures
def test_text_features(fixture_path):
    ref = load_fixture(fixture_path)
    method, clip_params = fixture_method(fixture_path)
    np.testing.assert_array_equal(
        np.asarray(method.token_ids),
        np.concatenate([ref["tokens.normal"], ref["tokens.abnormal"]]),
    )
    got = method.text_features(prompt_params(ref), clip_params)
    assert_close(got, ref["out.text_features_unnormalized"], "text features")
    normed = got / jnp.linalg.norm(got, axis=-1, keepdims=True)
    assert_close(normed, ref["out.text_features"], "normalised text features")


@parametrize_fixtures
def test_fp16_rounding_of_deep_prompts_is_what_matches(fixture_path):
    """Without the reference's float16 cast the text features land on the diagnostic array."""
    ref = load_fixture(fixture_path)
    method, clip_params = fixture_method(fixture_path)
    method.prompt_cfg.fp16_deep_prompts = False
    try:
        got = method.text_features(prompt_params(ref), clip_params)
    finally:
        method.prompt_cfg.fp16_deep_prompts = True
    assert_close(got, ref["diag.text_features_unnormalized_without_fp16_round"], "no-fp16 text")
    with pytest.raises(AssertionError):
        assert_close(got, ref["out.text_features_unnormalized"], "text features")


@parametrize_fixtures
@pytest.mark.parametrize(
    "name", ["visual.transformer.resblocks.20.mlp.c_fc.weight", "visual.ln_pre.bias"]
)
def test_parity_detects_a_perturbed_weight(fixture_path, name):
    """The checks above are not vacuous: one changed weight breaks vision parity."""
    ref = load_fixture(fixture_path)
    method, clip_params = fixture_method(fixture_path)
    block, rest = ("resblocks_20", ("mlp", "c_fc", "kernel")) if "resblocks" in name else (
        "ln_pre", ("bias",))
    perturbed = jax.tree_util.tree_map(lambda x: x, clip_params)
    node = perturbed["visual"][block]
    for key in rest[:-1]:
        node = node[key]
    node[rest[-1]] = node[rest[-1]] + 0.05 * jnp.sign(node[rest[-1]])
    out = _encode(method, perturbed, ref["input.images_nhwc"], (24,))
    with pytest.raises(AssertionError):
        assert_close(out.patch_tokens, ref["out.fl24.patch_tokens"], "fl24 patch tokens")
