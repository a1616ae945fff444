"""Parity with anomalib's WinCLIP / WinCLIP+ on its small open_clip model (winclip spec).

Every array of the fixture is reproduced within 1e-4 x max(1, max|ref|): prompt tokens (exactly),
text features per prompt and per class, image / window / patch embeddings, window scores, the
per-scale and zero-shot maps at 15x15 and 240x240, image scores, and for k = 1, 2, 4 the
reference embeddings, association scores, few-shot maps, final maps and scores. Fixtures:
`GENCLIP_WINCLIP_FIXTURES` (main .npz paths separated by ':'), default tests/data/winclip_*.npz.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import fixture_id, fixture_paths, load_fixture, load_sidecar

from genclip_jax import defaults
from genclip_jax.clip import weights
from genclip_jax.clip.model import CLIP
from genclip_jax.methods import winclip as wc
from genclip_jax.prompts import winclip as prompts

PATHS = fixture_paths("GENCLIP_WINCLIP_FIXTURES", "winclip_*.npz")
parametrize = pytest.mark.parametrize("path", PATHS, ids=[fixture_id(p) for p in PATHS])


def assert_parity(got, ref, name):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    err, tol = float(np.max(np.abs(got - ref))), 1e-4 * max(1.0, float(np.max(np.abs(ref))))
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"
    return err


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


@functools.cache
def setup(path, **changes):
    """(method, clip params, fixture) for the fixture's model with config `changes`."""
    side = load_sidecar(path)["config"]
    small = side["small_model"]
    heads = dict(vision_heads=small["vision_cfg"]["width"] // small["vision_cfg"]["head_width"],
                 text_heads=small["text_cfg"]["heads"])
    activation = "quick_gelu" if side["quick_gelu"] else "gelu"
    clip_config, params = weights.load(str(path), npz_prefix="sd.", activation=changes.pop(
        "activation", activation), **heads)
    config = defaults.base_config()
    config.method = "winclip"
    config.model.image_size = small["vision_cfg"]["image_size"]
    config.winclip.scales = tuple(side["scales"])
    config.winclip.temperature = side["temperature"]
    for field, value in changes.items():
        config.winclip[field] = value
    return wc.WinCLIP(config, clip_config), params, load_fixture(path)


@functools.cache
def encoded(path, **changes):
    method, params, ref = setup(path, **changes)
    return jax.device_get(jax.jit(method.encode_images)(params, nhwc(ref["input.images_nchw"])))


def zero_shot_batch(method, params, ref, class_name):
    text = np.asarray(method.text_features({}, params, class_name))
    return {"text": np.broadcast_to(text, (len(ref["input.images_nchw"]), *text.shape))}


@parametrize
def test_prompt_tokens_and_text_features(path):
    method, params, ref = setup(path)
    class_name = load_sidecar(path)["config"]["class_name"]
    normal, anomalous = prompts.token_ids(method.cfg, class_name, 77)
    np.testing.assert_array_equal(normal, ref["tokens.normal"])
    np.testing.assert_array_equal(anomalous, ref["tokens.anomalous"])
    encode = jax.jit(lambda p, ids: CLIP(method.clip_config).apply(
        {"params": p}, ids, method=CLIP.encode_text))
    assert_parity(encode(params, normal), ref["text.per_prompt_normal"], "per_prompt_normal")
    assert_parity(encode(params, anomalous), ref["text.per_prompt_anomalous"],
                  "per_prompt_anomalous")
    assert_parity(method.text_features({}, params, class_name), ref["text.embeddings"],
                  "text.embeddings")


@parametrize
def test_window_indices_are_the_reference_masks(path):
    method, _, ref = setup(path)
    for s in load_sidecar(path)["config"]["scales"]:
        np.testing.assert_array_equal(wc.window_indices(method.grid, s).T, ref[f"masks.s{s}"])


@parametrize
def test_image_window_and_patch_embeddings(path):
    method, _, ref = setup(path)
    feats = encoded(path)
    assert_parity(feats.image, ref["out.image_embeddings"], "image_embeddings")
    assert_parity(feats.patches, ref["out.patch_embeddings"], "patch_embeddings")
    sizes = [len(w) for w in method.windows]
    for s, w in zip(method.cfg.scales, wc.split_scales(feats.windows, sizes), strict=True):
        assert_parity(w, ref[f"out.window_embeddings.s{s}"], f"window_embeddings.s{s}")


@parametrize
def test_zero_shot_scores_and_maps(path):
    method, params, ref = setup(path)
    feats = encoded(path)
    batch = zero_shot_batch(method, params, ref, load_sidecar(path)["config"]["class_name"])
    zs = method.scores(feats, batch)["zero_shot"]
    assert_parity(zs["image_score"], ref["out.image_scores"], "image_scores")
    for i, s in enumerate(method.cfg.scales):
        assert_parity(zs["window_scores"][i], ref[f"out.window_scores.s{s}"], f"window_scores.s{s}")
        assert_parity(zs["maps"][i], ref[f"out.map15.s{s}"], f"map15.s{s}")
    assert_parity(zs["map"], ref["out.zero_shot_map15"], "zero_shot_map15")
    out = method.predict({}, params, feats, batch)
    assert_parity(out["anomaly_map"], ref["out.zero_shot_map240"], "zero_shot_map240")
    assert_parity(out["image_score"], ref["out.zero_shot_score"], "zero_shot_score")


@parametrize
@pytest.mark.parametrize("k", [1, 2, 4])
def test_few_shot(path, k):
    method, params, ref = setup(path)
    feats = encoded(path)
    refs = jax.device_get(jax.jit(method.encode_images)(params, nhwc(ref["input.refs_nchw"][:k])))
    sizes = [len(w) for w in method.windows]
    for s, w in zip(method.cfg.scales, wc.split_scales(refs.windows, sizes), strict=True):
        assert_parity(w, ref[f"fs.k{k}.ref_window_embeddings.s{s}"], f"k{k} ref windows s{s}")
    assert_parity(refs.patches, ref[f"fs.k{k}.ref_patch_embeddings"], f"k{k} ref patches")

    memory = wc.memory_bank(refs, method.windows)
    b = len(ref["input.images_nchw"])
    batch = zero_shot_batch(method, params, ref, load_sidecar(path)["config"]["class_name"])
    batch.update({f"memory_{key}": np.broadcast_to(v, (b, *v.shape)) for key, v in memory.items()})
    fs = wc.few_shot(feats, {"patches": batch["memory_patches"],
                             "windows": batch["memory_windows"]}, method.windows, method.grid)
    assert_parity(fs["patch_map"], ref[f"fs.k{k}.assoc_patch15"], f"k{k} assoc_patch15")
    for i, s in enumerate(method.cfg.scales):
        assert_parity(fs["window_assoc"][i], ref[f"fs.k{k}.assoc_window.s{s}"],
                      f"k{k} assoc_window.s{s}")
        assert_parity(fs["maps"][i], ref[f"fs.k{k}.map15.s{s}"], f"k{k} map15.s{s}")
    assert_parity(fs["map"], ref[f"fs.k{k}.few_shot_map15"], f"k{k} few_shot_map15")

    method.k = k
    try:
        out = method.predict({}, params, feats, batch)
    finally:
        method.k = 0
    assert_parity(out["anomaly_map"], ref[f"fs.k{k}.map240"], f"k{k} map240")
    assert_parity(out["image_score"], ref[f"fs.k{k}.score"], f"k{k} score")


def _max_error(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)))


@parametrize
def test_a_perturbed_weight_breaks_parity(path):
    method, params, ref = setup(path)
    block = params["visual"]["resblocks_1"]["mlp"]["c_fc"]
    bad = jax.tree.map(lambda x: x, params)
    bad["visual"]["resblocks_1"]["mlp"]["c_fc"] = {**block, "bias": block["bias"] + 0.05}
    feats = jax.jit(method.encode_images)(bad, nhwc(ref["input.images_nchw"]))
    tol = 1e-4 * max(1.0, float(np.abs(ref["out.window_embeddings.s2"]).max()))
    sizes = [len(w) for w in method.windows]
    assert _max_error(wc.split_scales(feats.windows, sizes)[0],
                      ref["out.window_embeddings.s2"]) > 10 * tol
    assert _max_error(feats.image, ref["out.image_embeddings"]) > 10 * tol


@parametrize
def test_every_knob_changes_the_numbers(path):
    """activation, patch_ln_post, scales and templates each move what they should."""
    _, _, ref = setup(path)
    quick = encoded(path, activation="quick_gelu")
    assert _max_error(quick.image, ref["out.image_embeddings"]) > 1e-3
    raw = encoded(path, patch_ln_post=False)
    assert _max_error(raw.patches, ref["out.patch_embeddings"]) > 1e-2
    assert_parity(raw.image, ref["out.image_embeddings"], "image (raw patches)")

    method, params, _ = setup(path, scales=(2,))
    feats = encoded(path, scales=(2,))
    assert_parity(feats.windows, ref["out.window_embeddings.s2"], "s2 windows alone")
    class_name = load_sidecar(path)["config"]["class_name"]
    batch = zero_shot_batch(method, params, ref, class_name)
    one_scale = method.scores(feats, batch)["zero_shot"]["map"]
    want = 2 / (1 / ref["out.image_scores"][:, None, None] + 1 / ref["out.map15.s2"])
    assert_parity(one_scale, want, "zero-shot map of scale 2 alone")
    assert _max_error(one_scale, ref["out.zero_shot_map15"]) > 1e-4

    method, params, _ = setup(path, templates=("a photo of a {}.",))
    assert _max_error(method.text_features({}, params, class_name), ref["text.embeddings"]) > 1e-3


def test_harmonic_map_of_a_zero_score_is_zero_and_uncovered_patches_are_zero():
    windows = wc.window_indices(3, 2)  # 4 windows on a 3x3 grid
    scores = jnp.array([[0.5, 0.25, 1.0, 0.0]])
    got = np.asarray(wc.harmonic_map(scores, windows, 3))[0]
    # Patch 0 is covered by window 0 alone; patch 4 (centre) by all four (one is 0 -> 0).
    assert got[0, 0] == pytest.approx(0.5)
    assert got[0, 1] == pytest.approx(2 / (1 / 0.5 + 1 / 0.25))
    assert got[1, 1] == 0.0
    assert np.asarray(wc.harmonic_map(jnp.ones((1, 1)), wc.window_indices(3, 3)[:1] * 0, 3)
                      )[0, 2, 2] == 0.0


def test_association_of_a_query_with_itself_is_not_negative():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 50, 64)) * 7.0
    got = np.asarray(wc.fewshot.association(x, x))
    assert got.min() >= 0.0 and got.max() < 1e-6
