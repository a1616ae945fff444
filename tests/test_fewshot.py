"""Few-shot for AnomalyCLIP and GenCLIP (`genclip_jax.fewshot`): the memory-bank distance against
a brute-force reference, the fused map and score knob by knob, the identities the issue names
(own reference -> zero map, weight 0 -> zero-shot, permuted references -> same), the errors, and
`eval` sampling its references from the target's train split."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from train_helpers import IMAGE_SIZE

from genclip_jax import defaults, evaluate, fewshot, validate
from genclip_jax.clip.model import CLIPConfig
from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline, synthetic
from genclip_jax.methods import create_method

# ----------------------------------------------------------------------------- pure functions


def _brute_force(tokens: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """mean_l (1 - max_m cos) of (L, B, N, D) test tokens against (L, k, N, D) references."""
    q = tokens[:, :, 1:] / np.linalg.norm(tokens[:, :, 1:], axis=-1, keepdims=True)
    r = refs[:, :, 1:].reshape(refs.shape[0], -1, refs.shape[-1])
    r = r / np.linalg.norm(r, axis=-1, keepdims=True)
    cos = np.einsum("lbpd,lmd->lbpm", q.astype(np.float64), r.astype(np.float64))
    distance = (1.0 - cos.max(axis=-1)).mean(axis=0)
    side = int(np.sqrt(distance.shape[-1]))
    return distance.reshape(-1, side, side)


@pytest.mark.parametrize("chunk_rows", [1, 5, 7, 16, 10_000])
def test_nearest_distance_equals_brute_force_for_every_chunk_size(chunk_rows):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 3, 17, 8)).astype(np.float32)  # 2 layers, 3 images, 4x4 grid
    refs = rng.normal(size=(2, 2, 17, 8)).astype(np.float32)  # k = 2: 32 bank rows
    bank = fewshot.memory_bank(refs, chunk_rows)
    assert bank.shape == (-(-32 // min(chunk_rows, 32)), 2, min(chunk_rows, 32), 8)
    got = np.asarray(fewshot.nearest_distance(tokens, bank))
    np.testing.assert_allclose(got, _brute_force(tokens, refs), atol=1e-6)


def test_a_reference_patch_is_at_distance_zero_and_order_does_not_matter():
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(2, 3, 10, 4)).astype(np.float32)  # 3x3 grid
    tokens = refs[:, 1:2] * 3.0  # the second reference, scaled: same directions
    got = np.asarray(fewshot.nearest_distance(tokens, fewshot.memory_bank(refs, 4)))
    np.testing.assert_allclose(got, 0.0, atol=1e-6)
    other = rng.normal(size=(2, 2, 10, 4)).astype(np.float32)
    permuted = refs[:, ::-1][:, :, np.r_[0, rng.permutation(9) + 1]]  # images and patches
    np.testing.assert_array_equal(
        np.asarray(fewshot.nearest_distance(other, fewshot.memory_bank(refs, 5))),
        np.asarray(fewshot.nearest_distance(other, fewshot.memory_bank(permuted, 5))))


def test_select_draws_k_by_seed_and_class_and_names_what_is_missing(tmp_path):
    paths = {"disc": [tmp_path / f"{i}.png" for i in range(6)], "checker": [tmp_path / "c.png"]}
    draws = {seed: fewshot.select(paths, "disc", 3, "refs", seed) for seed in range(6)}
    assert all(d == sorted(d) and len(set(d)) == 3 for d in draws.values())
    assert len({tuple(d) for d in draws.values()}) > 1  # the seed matters
    assert fewshot.select(paths, "disc", 3, "refs", 4) == draws[4]  # and is reproducible
    assert fewshot.select(paths, "disc", 6, "refs", 9) == paths["disc"]
    with pytest.raises(ValueError, match=r"class 'checker' has 1 normal reference images, "
                                         r"fewer than fewshot\.k=2"):
        fewshot.select(paths, "checker", 2, "refs")


# ------------------------------------------------------------------------- with a tiny model


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Two classes, 4 good train images each (the references), 3 test images each."""
    root = tmp_path_factory.mktemp("fewshot_data")
    synthetic.write_synthetic_dataset(root, image_size=IMAGE_SIZE, classes=("disc", "checker"),
                                      n_train_good=4, n_test_good=1, n_test_defect_per_type=1)
    return root


def make_config(method: str, data_root, **fewshot_fields):
    config = defaults.tiny_config(method)
    config.data.test_root = str(data_root)
    config.train.progress = False
    config.eval.batch_size = 8
    config.fewshot.update(fewshot_fields)
    return config


def _params(config):
    method = create_method(config, CLIPConfig(**config.model.random_arch.to_dict()))
    params = method.init(jax.random.PRNGKey(0))
    if config.method == "anomalyclip":  # larger prompts: maps that differ between images
        params = jax.tree.map(lambda x: x * 20.0, params)
    return params


def scores(config, data_root, split="test", entries=None):
    """{"anomaly_map", "image_score", ...} of a split's images through eval's own path."""
    entries = entries or meta_lib.split_entries(meta_lib.read_meta(data_root / "meta.json"),
                                                split)
    dataset = pipeline.Dataset.from_entries(data_root, entries)
    model = evaluate.load_model(config, "", params=_params(config))
    model = evaluate.adapt_to_classes(config, model, dataset, entries)
    return evaluate.predict_dataset(config, model, dataset)


@pytest.fixture(scope="module", params=["anomalyclip", "genclip"])
def parts(request, data_root):
    """Zero-shot, few-shot-only (weight 1, image weight 0) and default k=2 outputs."""
    method, ref = request.param, str(data_root)
    return {
        "method": method,
        "zero": scores(make_config(method, data_root), data_root),
        "few": scores(make_config(method, data_root, k=2, reference=ref, weight=1.0,
                                  image_weight=0.0), data_root),
        "default": scores(make_config(method, data_root, k=2, reference=ref), data_root),
    }


def test_weight_zero_is_exactly_zero_shot(parts, data_root):
    config = make_config(parts["method"], data_root, k=2, reference=str(data_root), weight=0.0,
                         image_weight=0.0)
    out = scores(config, data_root)
    np.testing.assert_array_equal(out["anomaly_map"], parts["zero"]["anomaly_map"])
    np.testing.assert_array_equal(out["image_score"], parts["zero"]["image_score"])


def test_the_fusion_follows_weight_and_image_weight(parts, data_root):
    zero, few = parts["zero"], parts["few"]
    assert few["anomaly_map"].min() >= 0 and few["anomaly_map"].max() > 1e-3
    assert not np.allclose(few["anomaly_map"], zero["anomaly_map"])
    # defaults 0.5 / 0.5
    np.testing.assert_allclose(parts["default"]["anomaly_map"],
                               0.5 * zero["anomaly_map"] + 0.5 * few["anomaly_map"], atol=1e-5)
    peak = few["anomaly_map"].max(axis=(1, 2))
    np.testing.assert_allclose(parts["default"]["image_score"],
                               zero["image_score"] + 0.5 * peak, atol=1e-5)
    config = make_config(parts["method"], data_root, k=2, reference=str(data_root), weight=0.3,
                         image_weight=0.7)
    compiled = fewshot.predict._cache_size()
    out = scores(config, data_root)
    assert fewshot.predict._cache_size() == compiled  # the weights are traced: no new compile
    np.testing.assert_allclose(out["anomaly_map"],
                               0.7 * zero["anomaly_map"] + 0.3 * few["anomaly_map"], atol=1e-5)
    np.testing.assert_allclose(out["image_score"], zero["image_score"] + 0.7 * peak, atol=1e-5)


def test_layers_seed_and_chunk_rows(parts, data_root):
    method = parts["method"]

    def few_shot_map(**fields):
        config = make_config(method, data_root, k=2, reference=str(data_root), weight=1.0,
                             image_weight=0.0, **fields)
        config.anomalyclip.features_list = (12, 24)  # the tiny default has one patch layer
        return scores(config, data_root)["anomaly_map"]

    every = few_shot_map()
    singles = [few_shot_map(layers=(layer,)) for layer in (12, 24)]
    assert not np.allclose(singles[0], every, atol=1e-4)
    # the default map is the mean over the method's patch layers (GenCLIP's 6/12/18/24: the
    # two chosen here do not average to it)
    if method == "anomalyclip":
        np.testing.assert_allclose(np.mean(singles, axis=0), every, atol=1e-5)
    else:
        assert not np.allclose(np.mean(singles, axis=0), every, atol=1e-4)
        np.testing.assert_allclose(few_shot_map(layers=(6, 12, 18, 24)), every, atol=1e-6)
    assert not np.allclose(few_shot_map(seed=1), every, atol=1e-4)
    np.testing.assert_allclose(few_shot_map(chunk_rows=5), every, atol=1e-6)


def test_an_image_that_is_its_own_reference_has_a_zero_few_shot_map(data_root, tmp_path):
    train = meta_lib.split_entries(meta_lib.read_meta(data_root / "meta.json"), "train")
    image = next(e for e in train if e["cls_name"] == "disc")
    refs = tmp_path / "refs" / "disc"
    refs.mkdir(parents=True)
    shutil.copy(data_root / image["img_path"], refs / "only.png")
    for method in ("anomalyclip", "genclip"):
        config = make_config(method, data_root, k=1, reference=str(tmp_path / "refs"),
                             weight=1.0, image_weight=0.0)
        out = scores(config, data_root, entries=[image])
        np.testing.assert_allclose(out["anomaly_map"], 0.0, atol=1e-5)


def test_batches_never_mix_classes_and_batching_does_not_change_scores(data_root):
    config = make_config("anomalyclip", data_root, k=2, reference=str(data_root))
    eight = scores(config, data_root)
    config.eval.batch_size, config.parallel.num_devices = 1, 1
    one = scores(config, data_root)
    np.testing.assert_allclose(one["anomaly_map"], eight["anomaly_map"], atol=1e-5)
    np.testing.assert_allclose(one["image_score"], eight["image_score"], atol=1e-6)
    plan, classes = pipeline.grouped_batch_indices(["a", "a", "a", "b", "b", "a"], 4,
                                                   process_index=1, process_count=2)
    assert classes == ["a", "b"]
    np.testing.assert_array_equal(plan, [[2, 5], [-1, -1]])


def test_too_few_references_fail_before_any_batch(data_root):
    config = make_config("genclip", data_root, k=5, reference=str(data_root))
    with pytest.raises(ValueError, match=r"class 'checker' has 4 normal reference images, "
                                         r"fewer than fewshot\.k=5"):
        scores(config, data_root)


@pytest.mark.parametrize(("fields", "command", "expected"), [
    ({"k": 2, "layers": (99,)}, "eval", r"fewshot\.layers: \[99\] are not among "
                                        r"anomalyclip\.features_list"),
    ({"k": 2, "split": "test"}, "eval", r"fewshot\.split: the references would be the test "
                                        r"images themselves"),
    ({"k": 2}, "predict", r"fewshot\.reference: fewshot\.k=2 needs a folder"),
    ({"k": 2}, "calibrate", r"fewshot\.reference: fewshot\.k=2 needs a folder"),
    ({"weight": 1.5}, "eval", r"fewshot\.weight"),
    ({"chunk_rows": 0}, "eval", r"fewshot\.chunk_rows"),
])
def test_bad_fewshot_fields_are_named(data_root, fields, command, expected):
    config = make_config("anomalyclip", data_root, **fields)
    with pytest.raises(ValueError, match=expected):
        validate.validate(config, command)


def test_eval_draws_references_from_the_targets_train_split(data_root, tmp_path):
    config = make_config("anomalyclip", data_root, k=2, seed=3)
    config.eval.heatmaps_per_class = 0
    rows = evaluate.evaluate(config, str(tmp_path / "run"), params=_params(config))
    out = tmp_path / "run" / "eval" / f"{data_root.name}_2shot_seed3"
    assert sorted(p.name for p in out.glob("metrics*")) == [
        "metrics_2shot_seed3.csv", "metrics_2shot_seed3.json", "metrics_2shot_seed3.md"]
    table = (out / "metrics_2shot_seed3.md").read_text()
    assert table.startswith(f"# {data_root.name}: 2-shot, references drawn with "
                            "fewshot.seed=3 from")
    recorded = json.loads((out / "eval.json").read_text())["config"]["fewshot"]
    assert (recorded["k"], recorded["seed"], recorded["reference"]) == (2, 3, str(data_root))
    assert set(rows) == {"disc", "checker"}
    # the same numbers as scoring the test split against the train split's references
    direct = scores(make_config("anomalyclip", data_root, k=2, seed=3,
                                reference=str(data_root)), data_root)
    entries = meta_lib.split_entries(meta_lib.read_meta(data_root / "meta.json"), "test")
    for cls in ("disc", "checker"):
        rows_of = [i for i, e in enumerate(entries) if e["cls_name"] == cls]
        good = [direct["image_score"][i] for i in rows_of if not entries[i]["anomaly"]]
        bad = [direct["image_score"][i] for i in rows_of if entries[i]["anomaly"]]
        auroc = np.mean([(b > g) + 0.5 * (b == g) for b in bad for g in good])
        assert rows[cls]["image_auroc"] == pytest.approx(auroc)
