"""Maps and losses: parity with the official PyTorch AnomalyCLIP outputs, plus properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import load_fixture, parametrize_fixtures
from make_torch_goldens import UPSAMPLE_SIZES, reference

from genclip_jax import losses, maps

RTOL = 1e-4  # max abs error <= RTOL * max(1, max |reference|)


def parity_error(got, ref) -> tuple[float, float]:
    """(max abs error, tolerance) of ``got`` against the reference array."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref))), RTOL * max(1.0, float(np.max(np.abs(ref))))


def assert_parity(name, got, ref):
    err, tol = parity_error(got, ref)
    assert err <= tol, f"{name}: max abs error {err:.3g} > tolerance {tol:.3g}"


def upsampled_maps(ref, fl):
    """Per-layer (L, B, 518, 518, 2) maps upsampled from the reference 37x37 probabilities."""
    sim = ref[f"out.{fl}.sim37"]
    size = ref["input.masks"].shape[-1]
    return jnp.stack([maps.upsample(jnp.asarray(s), size) for s in sim])


def loss_pieces(ref, fl, gamma=2.0, lam=4.0):
    """Every loss term of the reference training step from the upsampled maps."""
    probs = upsampled_maps(ref, fl)
    gt = jnp.asarray(ref["input.masks"])
    focal = jnp.stack([losses.focal_loss(p, gt, gamma=gamma) for p in probs])
    dice_abn = jnp.stack([losses.dice_loss(p[..., 1], gt) for p in probs])
    dice_nor = jnp.stack([losses.dice_loss(p[..., 0], 1.0 - gt) for p in probs])
    local = jnp.sum(focal + dice_abn + dice_nor)
    ce = losses.cross_entropy(
        jnp.asarray(ref["out.image_logits"]), jnp.asarray(ref["input.labels"])
    )
    return {
        "focal": focal,
        "dice_abn": dice_abn,
        "dice_nor": dice_nor,
        "local": local,
        "ce": ce,
        "total": lam * local + ce,
    }


@parametrize_fixtures
@pytest.mark.parametrize("fl", ["fl24", "fl4"])
def test_patch_probabilities_parity(fixture_path, fl):
    ref = load_fixture(fixture_path)
    tokens = ref[f"out.{fl}.patch_tokens"]
    for layer, layer_tokens in enumerate(tokens):
        got = maps.patch_probabilities(layer_tokens, ref["out.text_features"])
        assert_parity(f"{fl}.sim37[{layer}]", got, ref[f"out.{fl}.sim37"][layer])


@parametrize_fixtures
def test_image_logits_and_score_parity(fixture_path):
    ref = load_fixture(fixture_path)
    logits = maps.image_logits(ref["out.global_image_feature"], ref["out.text_features"])
    assert_parity("image_logits", logits, ref["out.image_logits"])
    assert_parity("image_score", maps.image_score(logits), ref["out.image_score"])
    # unnormalised text features give the same logits (normalised inside)
    raw = maps.image_logits(ref["out.global_image_feature"], ref["out.text_features_unnormalized"])
    assert_parity("image_logits(unnormalised T)", raw, ref["out.image_logits"])


@parametrize_fixtures
def test_upsample_parity(fixture_path):
    ref = load_fixture(fixture_path)
    assert_parity("fl24.map518", upsampled_maps(ref, "fl24")[0], ref["out.fl24.map518"])
    assert_parity("fl4.map518_abn", upsampled_maps(ref, "fl4")[..., 1], ref["out.fl4.map518_abn"])


@parametrize_fixtures
@pytest.mark.parametrize("fl", ["fl24", "fl4"])
def test_anomaly_map_and_blur_parity(fixture_path, fl):
    ref = load_fixture(fixture_path)
    per_layer = ref["out.fl24.map518"][None] if fl == "fl24" else upsampled_maps(ref, fl)
    amap = maps.anomaly_map(per_layer, reduce="sum")
    assert_parity(f"{fl}.anomaly_map", amap, ref[f"out.{fl}.anomaly_map"])
    blurred = jax.jit(maps.gaussian_blur)(jnp.asarray(ref[f"out.{fl}.anomaly_map"]))
    assert_parity(f"{fl}.anomaly_map_blur", blurred, ref[f"out.{fl}.anomaly_map_blur"])


@parametrize_fixtures
@pytest.mark.parametrize("fl", ["fl24", "fl4"])
def test_end_to_end_from_patch_tokens(fixture_path, fl):
    """patch tokens + text features -> probabilities -> 518 maps -> anomaly map -> blur."""
    ref = load_fixture(fixture_path)
    size = ref["input.masks"].shape[-1]

    @jax.jit
    def pipeline(tokens, text):
        probs = [maps.upsample(maps.patch_probabilities(t, text), size) for t in tokens]
        return maps.gaussian_blur(maps.anomaly_map(probs, reduce="sum"))

    got = pipeline(
        jnp.asarray(ref[f"out.{fl}.patch_tokens"]), jnp.asarray(ref["out.text_features"])
    )
    assert_parity(f"{fl}.anomaly_map_blur (end to end)", got, ref[f"out.{fl}.anomaly_map_blur"])


@parametrize_fixtures
@pytest.mark.parametrize("fl", ["fl24", "fl4"])
def test_losses_parity(fixture_path, fl):
    ref = load_fixture(fixture_path)
    pieces = loss_pieces(ref, fl)
    for name, value in pieces.items():
        assert_parity(f"loss.{fl}.{name}", value, ref[f"loss.{fl}.{name}"])


@parametrize_fixtures
def test_parity_checks_catch_changes(fixture_path):
    """The tolerances are tight enough to see small changes of the blur and the loss terms."""
    ref = load_fixture(fixture_path)
    amap = jnp.asarray(ref["out.fl4.anomaly_map"])
    err, tol = parity_error(maps.gaussian_blur(amap, sigma=3.9), ref["out.fl4.anomaly_map_blur"])
    assert err > tol, f"sigma 3.9 blur passes parity ({err:.3g} <= {tol:.3g})"
    err, tol = parity_error(maps.gaussian_blur(amap, truncate=3.0), ref["out.fl4.anomaly_map_blur"])
    assert err > tol, f"truncate-3 blur passes parity ({err:.3g} <= {tol:.3g})"

    for fl in ("fl24", "fl4"):
        changed = loss_pieces(ref, fl, gamma=1.9)
        for name in ("focal", "local", "total"):
            err, tol = parity_error(changed[name], ref[f"loss.{fl}.{name}"])
            assert err > tol, f"{fl} gamma 1.9: {name} passes parity ({err:.3g} <= {tol:.3g})"
        changed = loss_pieces(ref, fl, lam=3.9)
        err, tol = parity_error(changed["total"], ref[f"loss.{fl}.total"])
        assert err > tol, f"{fl} lambda 3.9: total passes parity ({err:.3g} <= {tol:.3g})"

    sim = maps.patch_probabilities(
        ref["out.fl24.patch_tokens"][0], ref["out.text_features"], temperature=0.0701
    )
    err, tol = parity_error(sim, ref["out.fl24.sim37"][0])
    assert err > tol, f"temperature 0.0701 passes parity ({err:.3g} <= {tol:.3g})"


# ----------------------------------------------------------------------------- properties


def test_gaussian_blur_matches_scipy_and_keeps_constants():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for shape, sigma in [
        ((2, 40, 29), 4.0),
        ((1, 5, 7), 4.0),
        ((3, 21, 21), 1.5),
        ((1, 9, 64), 2.0),
    ]:
        x = rng.normal(size=shape).astype(np.float32)
        got = np.asarray(maps.gaussian_blur(jnp.asarray(x), sigma=sigma))
        want = np.stack([ndimage.gaussian_filter(m, sigma=sigma) for m in x])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"{shape} sigma={sigma}")
    const = jnp.full((2, 30, 17), 0.37, jnp.float32)
    np.testing.assert_allclose(maps.gaussian_blur(const), const, atol=1e-6)
    blur = jax.jit(functools.partial(maps.gaussian_blur, sigma=2.5))
    np.testing.assert_allclose(blur(const), const, atol=1e-6)
    assert maps.gaussian_kernel(4.0).shape == (33,)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        maps.gaussian_blur(jnp.zeros((4, 4)))


def test_patch_probabilities_properties():
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    feats = jax.random.normal(key1, (3, 1 + 4 * 4, 8))
    text = jax.random.normal(key2, (2, 8))
    probs = jax.jit(maps.patch_probabilities)(feats, text)
    assert probs.shape == (3, 4, 4, 2)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    # scale invariance (both sides normalised) and per-image text features
    np.testing.assert_allclose(maps.patch_probabilities(5.0 * feats, 0.1 * text), probs, atol=1e-6)
    per_image = jnp.broadcast_to(text, (3, 2, 8))
    np.testing.assert_allclose(maps.patch_probabilities(feats, per_image), probs, atol=1e-6)
    # token i + 1 lands at grid cell (i // w, i % w); CLS is ignored
    swapped = feats.at[:, 0].set(feats[:, 6])
    np.testing.assert_allclose(maps.patch_probabilities(swapped, text), probs, atol=1e-6)
    single = maps.patch_probabilities(feats[:, jnp.array([0, 6])], text)
    np.testing.assert_allclose(single[:, 0, 0], probs[:, 1, 1], atol=1e-6)
    with pytest.raises(ValueError, match="square"):
        maps.patch_probabilities(feats[:, :-1], text)
    with pytest.raises(ValueError, match=r"\(2, D\) or \(B, 2, D\)"):
        maps.patch_probabilities(feats, jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match="batch"):
        maps.patch_probabilities(feats, jnp.zeros((2, 2, 8)))
    logits = jax.jit(maps.image_logits)(feats[:, 0], text)
    assert logits.shape == (3, 2)
    np.testing.assert_allclose(maps.image_score(logits), jax.nn.softmax(logits)[:, 1])


def test_upsample_matches_torch_bilinear():
    """= F.interpolate(bilinear, align_corners=False), stored by tests/make_torch_goldens.py."""
    ref = reference()
    x = ref["upsample.x"]
    for size in UPSAMPLE_SIZES:
        got = jax.jit(maps.upsample, static_argnums=1)(jnp.asarray(x), size)
        want = ref[f"upsample.{size[0]}x{size[1]}"]
        assert want.shape == (x.shape[0], *size, x.shape[-1])
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str(size))
    rng = np.random.default_rng(1)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(1, 6, 6, 2))), axis=-1)
    np.testing.assert_allclose(maps.upsample(probs, 20).sum(-1), 1.0, atol=1e-6)


def test_anomaly_map_reduce():
    rng = np.random.default_rng(2)
    p = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 2, 5, 5, 2)), jnp.float32), axis=-1)
    summed = maps.anomaly_map(p, reduce="sum")
    assert summed.shape == (2, 5, 5)
    np.testing.assert_allclose(summed, p[..., 1].sum(0), atol=1e-6)  # probabilities sum to 1
    np.testing.assert_allclose(maps.anomaly_map(list(p), reduce="mean"), summed / 3, atol=1e-6)
    np.testing.assert_allclose(jax.jit(maps.anomaly_map)(p), summed)
    with pytest.raises(ValueError, match="reduce"):
        maps.anomaly_map(p, reduce="max")
    with pytest.raises(ValueError, match=r"\(L, B, H, W, 2\)"):
        maps.anomaly_map(p[0])


def _batch(seed=3, batch=3, size=6):
    rng = np.random.default_rng(seed)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(batch, size, size, 2)), jnp.float32), -1)
    gt = jnp.asarray(rng.random((batch, size, size)) > 0.7, jnp.float32)
    logits = jnp.asarray(rng.normal(size=(batch, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, size=batch))
    return probs, gt, logits, labels


def _all_losses(probs, gt, logits, labels, valid=None):
    return {
        "focal": losses.focal_loss(probs, gt, valid=valid),
        "dice": losses.dice_loss(probs[..., 1], gt, valid=valid),
        "ce": losses.cross_entropy(logits, labels, valid=valid),
        "local": losses.anomalyclip_local_loss(probs, gt, valid=valid),
    }


def test_losses_valid_mask_semantics():
    probs, gt, logits, labels = _batch()
    plain = _all_losses(probs, gt, logits, labels)
    ones = _all_losses(probs, gt, logits, labels, valid=jnp.ones(3, bool))
    for name in plain:
        assert float(plain[name]) == float(ones[name]), name  # exactly the unmasked value

    # pad with 2 garbage rows (NaN probabilities/logits): the value equals the real rows' value
    pad_probs = jnp.concatenate([probs, jnp.full((2, *probs.shape[1:]), jnp.nan)])
    pad_gt = jnp.concatenate([gt, jnp.ones((2, *gt.shape[1:]))])
    pad_logits = jnp.concatenate([logits, jnp.full((2, 2), jnp.nan)])
    pad_labels = jnp.concatenate([labels, jnp.array([1, 0])])
    valid = jnp.array([1, 1, 1, 0, 0])
    padded = jax.jit(_all_losses)(pad_probs, pad_gt, pad_logits, pad_labels, valid)
    for name in plain:
        np.testing.assert_allclose(padded[name], plain[name], rtol=1e-6, err_msg=name)

    # padded rows get zero gradient (with finite padding)
    fin_probs = jnp.concatenate([probs, probs[:2]])
    fin_logits = jnp.concatenate([logits, logits[:2]])

    def total(p, lg):
        out = _all_losses(p, pad_gt, lg, pad_labels, valid)
        return out["local"] + out["ce"]

    g_probs, g_logits = jax.grad(total, argnums=(0, 1))(fin_probs, fin_logits)
    assert not np.any(np.asarray(g_probs[3:])) and not np.any(np.asarray(g_logits[3:]))
    assert np.all(np.isfinite(g_probs)) and np.any(np.asarray(g_probs[:3]))

    none = _all_losses(probs, gt, logits, labels, valid=jnp.zeros(3))
    assert all(float(v) == 0.0 for v in none.values()), none
    with pytest.raises(ValueError, match=r"valid must have shape \(B,\)"):
        losses.focal_loss(probs, gt, valid=jnp.ones(2))


def test_losses_known_values():
    # perfect prediction: focal ~ 0, dice ~ 0; uniform prediction: focal = 0.25 * log 2 (approx.)
    gt = jnp.zeros((1, 4, 4)).at[0, :2].set(1.0)
    perfect = jnp.stack([1.0 - gt, gt], axis=-1)
    assert float(losses.focal_loss(perfect, gt)) < 1e-8
    assert float(losses.dice_loss(perfect[..., 1], gt)) < 1e-6
    uniform = jnp.full((1, 4, 4, 2), 0.5)
    np.testing.assert_allclose(losses.focal_loss(uniform, gt), 0.25 * np.log(2.0), rtol=1e-3)
    logits = jnp.array([[0.0, 0.0], [2.0, -1.0]])
    want = np.mean([np.log(2.0), np.log1p(np.exp(-3.0))])
    np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([1, 0])), want, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, H, W, 2\)"):
        losses.focal_loss(uniform[..., :1], gt)
