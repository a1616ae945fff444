"""End-to-end parity of the AnomalyCLIP method (maps, scores, losses, gradients) with the
official code on the golden fixtures, for both features lists (fl24 and fl4)."""

import functools

import jax
import numpy as np
import pytest
from fixture_models import assert_close, fixture_method, prompt_params
from fixtures import load_fixture, parametrize_fixtures

FEATURE_KEYS = ["fl24", "fl4"]


@functools.lru_cache(maxsize=4)
def _run(fixture_path, key):
    """Forward, predict and loss + gradients of the method on the fixture inputs."""
    ref = load_fixture(fixture_path)
    method, clip_params = fixture_method(fixture_path, key)
    params = prompt_params(ref)
    feats = jax.jit(method.encode_images)(clip_params, ref["input.images_nhwc"])
    batch = {"mask": ref["input.masks"], "label": ref["input.labels"]}
    out = jax.jit(method.forward)(params, clip_params, feats)
    upsampled = jax.jit(method.upsampled)(out["probs"])
    pred = jax.jit(lambda p: method.predict(p, clip_params, feats, batch))(params)
    (_, parts), grads = jax.jit(
        jax.value_and_grad(lambda p: method.loss(p, clip_params, feats, batch), has_aux=True)
    )(params)
    return ref, method, out, upsampled, pred, parts, grads, feats


@parametrize_fixtures
@pytest.mark.parametrize("key", FEATURE_KEYS)
def test_maps_and_scores(fixture_path, key):
    ref, _, out, upsampled, pred, *_ = _run(fixture_path, key)
    assert_close(out["probs"], ref[f"out.{key}.sim37"], f"{key} sim37")
    if f"out.{key}.map518" in ref:
        assert_close(upsampled[-1], ref[f"out.{key}.map518"], f"{key} map518")
    if f"out.{key}.map518_abn" in ref:
        assert_close(upsampled[..., 1], ref[f"out.{key}.map518_abn"], f"{key} map518_abn")
    raw = np.asarray(upsampled[..., 1] + 1 - upsampled[..., 0]).sum(0) / 2
    assert_close(raw, ref[f"out.{key}.anomaly_map"], f"{key} anomaly map")
    assert_close(pred["anomaly_map"], ref[f"out.{key}.anomaly_map_blur"], f"{key} blurred map")
    assert_close(out["image_logits"], ref["out.image_logits"], "image logits")
    assert_close(pred["image_score"], ref["out.image_score"], "image score")


@parametrize_fixtures
@pytest.mark.parametrize("key", FEATURE_KEYS)
def test_losses(fixture_path, key):
    ref, *_, parts, _, _ = _run(fixture_path, key)
    for name in ("focal", "dice_abn", "dice_nor", "local", "ce", "total"):
        assert_close(parts[name], ref[f"loss.{key}.{name}"], f"{key} loss {name}")


@parametrize_fixtures
@pytest.mark.parametrize("key", FEATURE_KEYS)
def test_gradients(fixture_path, key):
    """Within 2e-3 x max|reference|: the fp16 rounding of the deep prompts' cotangents."""
    ref, *_, grads, _ = _run(fixture_path, key)
    expected = prompt_params({k.replace(f"grad.{key}.", "pl."): v for k, v in ref.items()
                              if k.startswith(f"grad.{key}.")})
    for name, value in expected.items():
        err = np.max(np.abs(np.asarray(grads[name]) - value))
        assert err <= 2e-3 * np.max(np.abs(value)), f"{key} grad {name}: {err:.3g}"


@parametrize_fixtures
@pytest.mark.parametrize(
    ("field", "value", "checked"),
    [("sigma", 3.9, "blur"), ("local_loss_weight", 3.0, "total"), ("temperature", 0.08, "score")],
)
def test_changed_recipe_breaks_parity(fixture_path, field, value, checked):
    """The parity checks see a changed blur, loss weight or temperature (the frozen features
    are the parity run's: only what follows them changes)."""
    ref, method, *_, feats = _run(fixture_path, "fl24")
    clip_params = fixture_method(fixture_path, "fl24")[1]
    old = method.cfg[field]
    method.cfg[field] = value
    try:
        params = prompt_params(ref)
        batch = {"mask": ref["input.masks"], "label": ref["input.labels"]}
        pred = jax.jit(lambda p: method.predict(p, clip_params, feats, batch))(params)
        _, parts = jax.jit(lambda p: method.loss(p, clip_params, feats, batch))(params)
    finally:
        method.cfg[field] = old
    got, want = {
        "blur": (pred["anomaly_map"], ref["out.fl24.anomaly_map_blur"]),
        "total": (parts["total"], ref["loss.fl24.total"]),
        "score": (pred["image_score"], ref["out.image_score"]),
    }[checked]
    with pytest.raises(AssertionError):
        assert_close(got, want, checked)
