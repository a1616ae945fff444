"""The vision forward's fast paths give the numbers of the plain forms: attention one head at a
time on CPU, and the last block computed for the CLS row only when nothing reads the rest."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixture_models import assert_close, fixture_method
from fixtures import load_fixture, load_sidecar, parametrize_fixtures

from genclip_jax.clip import transformer
from genclip_jax.clip.model import CLIP, CLIPConfig, init_params


def _qkv(b: int, n: int, h: int, d: int):
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    return [jax.random.normal(key, (b, n, h, d)) * 2.0 for key in keys]


@pytest.mark.parametrize("is_causal", [False, True])
def test_per_head_attention_equals_batched(monkeypatch, is_causal):
    q, k, v = _qkv(2, 37, 3, 8)
    batched = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=is_causal))(q, k, v)
    monkeypatch.setattr(transformer, "PER_HEAD_MIN_SCORE_BYTES", 0)
    per_head = jax.jit(lambda q, k, v: transformer.multi_head_attention(
        q, k, v, is_causal=is_causal))(q, k, v)
    # Same formula per head; only the summation order may differ.
    np.testing.assert_allclose(np.asarray(per_head), np.asarray(batched), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(batched).max()) > 0.1


@pytest.mark.parametrize("threshold, loops", [(0, True), (1 << 60, False)])
def test_per_head_threshold_picks_the_path(monkeypatch, threshold, loops):
    monkeypatch.setattr(transformer, "PER_HEAD_MIN_SCORE_BYTES", threshold)
    q, k, v = _qkv(1, 16, 2, 4)
    attention = jax.jit(lambda *qkv: transformer.multi_head_attention(*qkv))
    hlo = attention.lower(q, k, v).compile().as_text()
    assert ("while" in hlo) == loops


@parametrize_fixtures
def test_per_head_vision_forward_matches_the_reference(monkeypatch, fixture_path):
    """The official code's features (the parity fixtures) through the per-head path."""
    monkeypatch.setattr(transformer, "PER_HEAD_MIN_SCORE_BYTES", 0)
    ref = load_fixture(fixture_path)
    method, clip_params = fixture_method(fixture_path)
    for key, layers in load_sidecar(fixture_path)["config"]["features_lists"].items():
        out = jax.jit(lambda p, x, layers=tuple(layers): method.clip.apply(
            {"params": p}, x, layers, method=CLIP.encode_image))(clip_params,
                                                                 ref["input.images_nhwc"])
        assert_close(out.global_feature, ref["out.global_image_feature"], "global feature")
        assert_close(out.patch_tokens, ref[f"out.{key}.patch_tokens"], f"{key} patch tokens")


TINY = CLIPConfig(embed_dim=16, image_resolution=56, vision_layers=4, vision_width=32,
                  vision_heads=2, vision_patch_size=14, context_length=8, vocab_size=64,
                  text_width=32, text_heads=2, text_layers=1, dpam_start=2)


def _encode(config: CLIPConfig, hidden_layers: tuple[int, ...]):
    """(features, compiled FLOPs) of taps (2, 4) on a 56x56 image."""
    params = init_params(config)
    images = jax.random.normal(jax.random.PRNGKey(5), (2, 56, 56, 3))
    fn = jax.jit(lambda p, x: CLIP(config).apply(
        {"params": p}, x, (2, 4), hidden_layers, method=CLIP.encode_image))
    flops = fn.lower(params, images).compile().cost_analysis()["flops"]
    return fn(params, images), flops


@pytest.mark.parametrize("global_mode", ["cls_no_ln_post", "clip"])
def test_last_block_for_the_cls_row_only(global_mode):
    """A hidden mean of layer 4 reads the whole vanilla output, so that forward computes the
    full last block: same features, and at least the last MLP's FLOPs on the 2 x 16 patch rows
    more (two 32x128 matmuls)."""
    config = TINY.replace(global_mode=global_mode)
    trimmed, trimmed_flops = _encode(config, ())
    full, full_flops = _encode(config, (4,))
    np.testing.assert_allclose(trimmed.global_feature, full.global_feature, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(trimmed.patch_tokens, full.patch_tokens)
    assert float(jnp.abs(trimmed.global_feature).max()) > 0.1
    assert full_flops - trimmed_flops >= 2 * 2 * (2 * 16) * 32 * 128
