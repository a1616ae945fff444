"""The CPU fast path of CLIP attention (one head at a time) gives the batched form's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixture_models import assert_close, fixture_method
from fixtures import load_fixture, load_sidecar, parametrize_fixtures

from genclip_jax.clip import transformer
from genclip_jax.clip.model import CLIP


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
    # Same ops per head; only the dot kernels' summation order may differ.
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
