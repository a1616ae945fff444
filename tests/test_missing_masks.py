"""Defects without masks: pixel losses count only rows with a mask (both methods, every term),
the image loss counts every row, a batch without masks trains the image term only and stays
finite; evaluation reports pixel metrics over the masked images, with the counts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genclip_jax import defaults, evaluate, losses, metrics
from genclip_jax.backbone import load_backbone
from genclip_jax.methods import create_method

SIZE = 56


@functools.lru_cache(maxsize=2)
def _setup(method_name: str):
    config = defaults.tiny_config(method_name)
    config.model.image_size = SIZE
    clip_config, clip_params = load_backbone(config.model)
    method = create_method(config, clip_config)
    params = method.init(jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (4, SIZE, SIZE, 3))
    feats = jax.jit(method.encode_images)(clip_params, images)
    mask = np.zeros((4, SIZE, SIZE), np.float32)
    mask[1, 10:30, 20:40] = 1.0  # row 1: a defect with its mask; rows 2, 3: defects without
    batch = {"mask": jnp.asarray(mask), "label": jnp.asarray([0, 1, 1, 1]),
             "valid": jnp.ones(4, bool)}
    batch.update(method.host_inputs({"cls_name": ["part"] * 4}))
    loss = jax.jit(lambda p, b: method.loss(p, clip_params, feats, b))
    return method, params, batch, loss


@pytest.mark.parametrize("method_name", ["anomalyclip", "genclip"])
def test_pixel_terms_count_only_rows_with_a_mask_and_the_image_term_every_row(method_name):
    _, params, batch, loss = _setup(method_name)
    ignore = {**batch, "has_mask": jnp.asarray([True, True, False, False])}
    _, parts = loss(params, ignore)
    # The pixel terms equal those of a batch where the unmasked rows are padding ...
    _, masked_only = loss(params, {**batch, "valid": jnp.asarray([True, True, False, False])})
    # ... and the image term the one of the full batch.
    _, full = loss(params, batch)
    pixel_terms = [k for k in parts if k not in ("ce", "total")]
    assert "local" in pixel_terms
    for key in pixel_terms:
        np.testing.assert_allclose(parts[key], masked_only[key], rtol=1e-6)
    np.testing.assert_allclose(parts["ce"], full["ce"], rtol=1e-6)
    # "zeros" (has_mask everywhere, the reference) treats the two defects as all-normal pixels.
    assert abs(float(full["local"]) - float(parts["local"])) > 1e-4
    assert abs(float(masked_only["ce"]) - float(parts["ce"])) > 1e-6


@pytest.mark.parametrize("method_name", ["anomalyclip", "genclip"])
def test_a_batch_without_any_mask_trains_the_image_term_only_and_stays_finite(method_name):
    method, params, batch, loss = _setup(method_name)
    none = {**batch, "has_mask": jnp.zeros(4, bool)}
    total, parts = loss(params, none)
    assert float(parts["local"]) == 0.0
    weight = method.cfg.image_loss_weight if method_name == "genclip" else 1.0
    np.testing.assert_allclose(total, weight * parts["ce"], rtol=1e-6)
    grads = jax.grad(lambda p: loss(p, none)[0])(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in leaves)


def test_pixel_rows_combines_valid_and_has_mask():
    assert losses.pixel_rows({}) is None
    valid, has = jnp.asarray([True, True, False]), jnp.asarray([True, False, True])
    np.testing.assert_array_equal(losses.pixel_rows({"valid": valid}), valid)
    np.testing.assert_array_equal(losses.pixel_rows({"valid": valid, "has_mask": has}),
                                  [True, False, False])


def _results(seed: int = 0) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Two classes of 6 images: 3 normal, 3 defective, one defect of class a without a mask."""
    rng = np.random.default_rng(seed)
    n, s = 12, 16
    labels = np.array([0, 0, 0, 1, 1, 1] * 2)
    masks = np.zeros((n, s, s), np.uint8)
    for i in np.flatnonzero(labels):
        masks[i, 4:9, 3:11] = 1
    maps = rng.uniform(size=(n, s, s)).astype(np.float32) + masks * rng.uniform(0, 1, (n, 1, 1))
    has_mask = np.ones(n, bool)
    has_mask[5] = False
    masks[5] = 0  # what the pipeline gives a defect without a mask
    results = {"anomaly_map": maps, "image_score": rng.uniform(size=n).astype(np.float32),
               "mask": masks, "label": labels.astype(np.int32), "has_mask": has_mask}
    entries = [{"cls_name": "a"}] * 6 + [{"cls_name": "b"}] * 6
    return entries, results


def test_eval_rows_pixel_metrics_over_masked_images_image_metrics_over_all():
    entries, results = _results()
    config = defaults.tiny_config()
    rows = evaluate.class_rows(entries, results, config)
    keep = np.array([0, 1, 2, 3, 4])  # class a without its unmasked defect (index 5)
    expected_pixel = metrics.compute_class_metrics(
        results["anomaly_map"][keep], results["mask"][keep].astype(np.float32),
        metrics=[m for m in config.eval.metrics if m.startswith("pixel_")])
    expected_image = metrics.compute_class_metrics(
        scores=results["image_score"][:6], labels=results["label"][:6],
        metrics=[m for m in config.eval.metrics if m.startswith("image_")])
    for name, value in {**expected_pixel, **expected_image}.items():
        assert rows["a"][name] == value, name
    assert (rows["a"]["defective"], rows["a"]["defective_with_mask"]) == (3, 2)
    assert (rows["b"]["defective"], rows["b"]["defective_with_mask"]) == (3, 3)
    table = metrics.format_markdown(rows).splitlines()
    assert table[0].endswith("| defective | defective_with_mask |")
    assert table[-1].endswith("| 6 | 5 |")  # the mean row sums the counts
    # The "zeros" rule (has_mask everywhere) counts the defect as all-normal pixels instead.
    zeros = evaluate.class_rows(entries, {**results, "has_mask": np.ones(12, bool)}, config)
    assert zeros["a"]["pixel_auroc"] != rows["a"]["pixel_auroc"]
    assert "defective" not in zeros["a"]  # no count columns when every defect has a mask
