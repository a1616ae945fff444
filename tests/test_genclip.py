"""Structure of the GenCLIP reconstruction (no reference code exists): prompt layout, branches,
fusion, per-image indexing, what gets gradients, shapes. Tiny random CLIP at 56 px."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from genclip_jax import defaults, maps
from genclip_jax.backbone import load_backbone
from genclip_jax.clip.tokenizer import EOT_ID, SOT_ID, encode
from genclip_jax.methods.genclip import GenCLIP
from genclip_jax.prompts import genclip as prompts

SIZE = 56  # 4 x 4 patch grid with the tiny backbone's patch 14
NAMES = ("bottle", "metal_nut")
TRAINABLE = {"normal_ctx", "abnormal_ctx", "gqp", "mvp_kernel", "mvp_bias"}


def tiny_config(**genclip: object) -> ml_collections.ConfigDict:
    """The tiny GenCLIP config at 56 px; keyword names are `genclip` fields, e.g. cnf__rule."""
    config = defaults.tiny_config("genclip")
    config.model.image_size = SIZE
    for name, value in genclip.items():
        *parents, leaf = name.split("__")
        node = config.genclip
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


@functools.lru_cache(maxsize=1)
def backbone():
    return load_backbone(tiny_config().model)


def make_method(**genclip: object) -> tuple[GenCLIP, dict]:
    clip_config, clip_params = backbone()
    return GenCLIP(tiny_config(**genclip), clip_config), clip_params


def make_batch(method: GenCLIP, names=NAMES, seed: int = 1) -> tuple[jax.Array, dict]:
    """Images (B, S, S, 3) and the device batch of the given class names."""
    b = len(names)
    images = jax.random.normal(jax.random.PRNGKey(seed), (b, SIZE, SIZE, 3))
    mask = np.zeros((b, SIZE, SIZE), np.float32)
    mask[-1, 10:30, 20:40] = 1.0
    batch = {"mask": jnp.asarray(mask), "label": jnp.asarray([0] * (b - 1) + [1])}
    batch.update(method.host_inputs({"cls_name": list(names)}))
    return images, batch


@functools.partial(jax.jit, static_argnums=0)
def run(method: GenCLIP, clip_params, params, images, batch):
    """Features, forward outputs, predictions and loss parts of one batch (one compile per
    method object and batch shape)."""
    feats = method.encode_images(clip_params, images)
    out = method.forward(params, clip_params, feats, batch)
    pred = method.predict(params, clip_params, feats, batch)
    _, parts = method.loss(params, clip_params, feats, batch)
    return feats, out, pred, parts


@functools.lru_cache(maxsize=1)
def default_run():
    """(method, clip_params, params, images, batch, feats, out, pred, parts) of the default
    config on two images of different classes, shared by the tests that only read them."""
    method, clip_params = make_method()
    params = method.init(jax.random.PRNGKey(0))
    images, batch = make_batch(method)
    return method, clip_params, params, images, batch, *run(
        method, clip_params, params, images, batch)


def test_prompt_layout_is_static():
    method, _ = make_method()
    cfg = method.cfg
    k, m = cfg.state_len, cfg.gqp_len
    ids = prompts.class_token_ids(cfg, "metal nut", 77)
    slot = encode(prompts.PLACEHOLDER)
    assert len(slot) == 1
    for row, words in zip(ids, (["metal nut."], ["damaged metal nut."]), strict=True):
        suffix = encode(words[0])
        eot = 1 + k + m + len(suffix)
        assert row[0] == SOT_ID
        assert (row[1 : 1 + k + m] == slot[0]).all()
        assert list(row[1 + k + m : eot]) == suffix
        assert row[eot] == EOT_ID and int(np.argmax(row)) == eot
        assert not row[eot + 1 :].any()
    np.testing.assert_array_equal(
        method.query_ids, prompts.class_token_ids(cfg, cfg.cnf.generic_word, 77))


def test_class_name_beyond_context_raises_naming_it():
    method, _ = make_method()
    name = "_".join(["gizmo"] * 80)
    with pytest.raises(ValueError, match=r"gizmo gizmo.*genclip\.state_len"):
        method.host_inputs({"cls_name": [name]})


def test_host_inputs_use_cnf_words_and_generic_padding():
    method, clip_params = make_method(cnf__rule="A")
    decisions = method.prepare_eval(clip_params, ["pcb1", "metal_nut"], class_features=None)
    assert {n: d.word for n, d in decisions.items()} == {"pcb1": "object", "metal_nut": "metal nut"}
    ids = method.host_inputs({"cls_name": ["pcb1", "metal_nut", ""]}, decisions)["prompt_ids"]
    assert ids.shape == (3, 2, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0], method.query_ids)
    np.testing.assert_array_equal(ids[2], method.query_ids)
    np.testing.assert_array_equal(ids[1], method._ids("metal nut"))
    # The method itself is unchanged: without the decisions, pcb1 is its own word again.
    plain = method.host_inputs({"cls_name": ["pcb1"]})["prompt_ids"]
    np.testing.assert_array_equal(plain[0], method._ids("pcb1"))
    assert not np.array_equal(plain[0], method.query_ids)


def test_shapes_of_every_output():
    method, clip_params, params, images, batch, feats, out, pred, parts = default_run()
    c = method.clip_config
    k, m, n_layers = method.cfg.state_len, method.cfg.gqp_len, len(method.cfg.layers)
    assert jax.tree_util.tree_map(jnp.shape, params) == {
        "normal_ctx": (k, c.text_width), "abnormal_ctx": (k, c.text_width),
        "gqp": (m, c.text_width), "mvp_kernel": (n_layers, c.vision_width, c.text_width),
        "mvp_bias": (n_layers, c.text_width),
    }
    b, h, d = images.shape[0], SIZE // c.vision_patch_size, c.embed_dim
    assert feats.global_feature.shape == (b, d)
    assert feats.patch_tokens.shape == (n_layers, b, 1 + h * h, d)
    assert feats.hidden_mean.shape == (n_layers, b, c.vision_width)
    t_vis, t_q = method.branch_text(params, clip_params, feats, batch["prompt_ids"])
    assert t_vis.shape == (b, n_layers, 2, d) and t_q.shape == (2, d)
    assert out["probs_vis"].shape == out["probs_q"].shape == (n_layers, b, h, h, 2)
    assert out["logits_vis"].shape == out["logits_q"].shape == (b, 2)
    assert pred["anomaly_map"].shape == (b, SIZE, SIZE) and pred["image_score"].shape == (b,)
    assert set(parts) == {"local", "ce", "total"} and all(v.shape == () for v in parts.values())
    cnf_feats = method.class_image_features(clip_params, images)  # ln_post(CLS) @ proj
    assert cnf_feats.shape == (b, d)
    assert float(jnp.abs(cnf_feats - feats.global_feature).max()) > 1e-3


def test_fusion_weight_is_the_vision_branch_weight():
    _, clip_params, params, _, batch, feats = default_run()[:6]
    for w in (0.0, 0.3, 1.0):
        method, _ = make_method(fusion_w=w, image_score="global")
        out = method.forward(params, clip_params, feats, batch)
        a_vis, a_q = method.branch_maps(out)
        pred = method.predict(params, clip_params, feats, batch)
        want = maps.gaussian_blur(w * a_vis + (1 - w) * a_q, method.cfg.sigma)
        np.testing.assert_allclose(pred["anomaly_map"], want, atol=1e-6)
        score = (w * maps.image_score(out["logits_vis"])
                 + (1 - w) * maps.image_score(out["logits_q"]))
        np.testing.assert_allclose(pred["image_score"], score, atol=1e-6)
        if w == 0.0:  # the query-only branch alone, blurred
            np.testing.assert_array_equal(
                pred["anomaly_map"], maps.gaussian_blur(a_q, method.cfg.sigma))
    assert float(jnp.abs(a_vis - a_q).max()) > 1e-4  # the two branches do differ


def test_zero_mvp_and_generic_word_give_identical_branches():
    method, clip_params, params, images, _, _, named, _, _ = default_run()
    zero = {**params, "mvp_kernel": jnp.zeros_like(params["mvp_kernel"]),
            "mvp_bias": jnp.zeros_like(params["mvp_bias"])}
    _, generic = make_batch(method, names=("object", "object"))
    _, out, _, _ = run(method, clip_params, zero, images, generic)
    a_vis, a_q = method.branch_maps(out)
    np.testing.assert_allclose(a_vis, a_q, atol=1e-6)
    np.testing.assert_allclose(out["logits_vis"], out["logits_q"], atol=1e-4)
    # Either change alone separates them: a class word, or a non-zero MVP.
    _, with_mvp, _, _ = run(method, clip_params, params, images, generic)
    _, zero_named, _, _ = run(method, clip_params, zero, images, make_batch(method)[1])
    for other in (named, with_mvp, zero_named):
        assert float(jnp.abs(other["probs_vis"] - out["probs_vis"]).max()) > 1e-4


def test_without_mvp_the_vision_branch_is_the_class_word_gqp_prompt():
    method, clip_params = make_method(use_mvp=False)
    params = method.init(jax.random.PRNGKey(0))
    assert set(params) == TRAINABLE - {"mvp_kernel", "mvp_bias"}
    images, batch = make_batch(method, names=("object", "bottle"))
    feats = method.encode_images(clip_params, images)
    t_vis, t_q = method.branch_text(params, clip_params, feats, batch["prompt_ids"])
    assert t_vis.shape[:2] == (2, len(method.cfg.layers))
    np.testing.assert_allclose(t_vis[0], jnp.broadcast_to(t_q, t_vis[0].shape), atol=1e-5)
    np.testing.assert_array_equal(t_vis[1, 0], t_vis[1, -1])
    assert float(jnp.abs(t_vis[1, 0] - t_q).max()) > 1e-4


def test_permuting_the_batch_permutes_maps_scores_and_losses():
    method, clip_params, params, images, batch, feats, _, pred, parts = default_run()
    take = lambda rows: (images[rows], jax.tree_util.tree_map(lambda x: x[rows], batch))
    perm = np.array([1, 0])
    _, _, pred_p, parts_p = run(method, clip_params, params, *take(perm))
    for key in ("anomaly_map", "image_score"):
        np.testing.assert_allclose(pred_p[key], pred[key][perm], atol=1e-5)
    for key in ("local", "ce", "total"):
        np.testing.assert_allclose(parts_p[key], parts[key], rtol=1e-5)
    # Row i of the batch == image i in a batch of its own copies (same shapes, no cross-talk);
    # its loss == the batch loss restricted to row i.
    for i in range(2):
        _, _, pred_i, parts_i = run(method, clip_params, params, *take(np.array([i, i])))
        for key in ("anomaly_map", "image_score"):
            np.testing.assert_allclose(pred_i[key][0], pred[key][i], atol=1e-5)
        only_i = {**batch, "valid": jnp.arange(2) == i}
        _, parts_only = method.loss(params, clip_params, feats, only_i)
        for key in ("local", "ce", "total"):
            np.testing.assert_allclose(parts_only[key], parts_i[key], rtol=1e-5)


def test_gradients_reach_only_the_prompts_and_mvp():
    method, clip_params, params, images, batch = default_run()[:5]
    assert set(params) == TRAINABLE

    def loss(params, clip_params):
        feats = method.encode_images(clip_params, images)
        return method.loss(params, clip_params, feats, batch)[0]

    grads, clip_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, clip_params)
    for name, g in grads.items():
        assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {name}"
    leaves = jax.tree_util.tree_leaves_with_path(clip_grads)
    assert leaves
    nonzero = [jax.tree_util.keystr(p) for p, g in leaves if bool(jnp.any(g != 0))]
    assert not nonzero, f"gradient reaches the frozen CLIP: {nonzero[:5]}"


def test_mvp_target_first_changes_only_the_first_query_token():
    params = {"gqp": jnp.arange(12.0).reshape(4, 3)}
    mvp = jnp.asarray([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])  # (B=2, Ct)
    every = prompts.query_tokens(params, mvp, "all")
    first = prompts.query_tokens(params, mvp, "first")
    assert every.shape == first.shape == (2, 4, 3)
    np.testing.assert_array_equal(every, params["gqp"] + mvp[:, None])
    np.testing.assert_array_equal(first[:, 0], params["gqp"][0] + mvp)
    np.testing.assert_array_equal(first[:, 1:], jnp.broadcast_to(params["gqp"][1:], (2, 3, 3)))
    np.testing.assert_array_equal(prompts.query_tokens(params, None, "first"), params["gqp"])
    with pytest.raises(ValueError, match=r"genclip\.mvp_target"):
        prompts.query_tokens(params, mvp, "middle")


def test_mvp_source_vv_differs_from_vanilla():
    vanilla, clip_params = make_method()
    vv, _ = make_method(mvp_source="vv")
    images, _ = make_batch(vanilla)
    f_vanilla = vanilla.encode_images(clip_params, images)
    f_vv = vv.encode_images(clip_params, images)
    np.testing.assert_array_equal(f_vanilla.patch_tokens, f_vv.patch_tokens)
    # Reading the vanilla stream at the last layer makes that forward compute the whole last
    # block, the other only its CLS row: the same sums in another order.
    np.testing.assert_allclose(f_vanilla.global_feature, f_vv.global_feature, rtol=1e-6, atol=1e-6)
    per_layer = jnp.abs(f_vanilla.hidden_mean - f_vv.hidden_mean).max(axis=(1, 2))
    assert float(per_layer.min()) > 1e-4  # every tapped layer (all >= dpam_start) differs


def test_bad_settings_raise_naming_the_field():
    with pytest.raises(ValueError, match=r"genclip\.image_text_layer"):
        make_method(image_text_layer="first")
    with pytest.raises(ValueError, match=r"genclip\.image_score"):
        make_method(image_score="median")
    method, _ = make_method(mvp_init="ones")
    with pytest.raises(ValueError, match=r"genclip\.mvp_init"):
        method.init(jax.random.PRNGKey(0))
