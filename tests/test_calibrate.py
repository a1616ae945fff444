"""calibrate: thresholds from normal (and labelled) images; predict: decisions, masks, panels."""

from __future__ import annotations

import csv
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from PIL import Image
from train_helpers import tiny_config

from genclip_jax import calibrate, checkpoint, predict, run_dir
from genclip_jax.clip.model import CLIPConfig
from genclip_jax.data import synthetic
from genclip_jax.methods import create_method

# ----------------------------------------------------------------------------- pure functions


def test_fpr_threshold_is_the_quantile_of_the_normal_scores():
    scores = np.arange(101, dtype=np.float64) / 100  # 0.00 .. 1.00
    assert calibrate.fpr_threshold(scores, 0.01) == pytest.approx(0.99)
    assert calibrate.fpr_threshold(scores, 0.05) == pytest.approx(0.95)
    assert calibrate.fpr_threshold(scores.reshape(1, 101), 0.10) == pytest.approx(0.90)


def test_f1_threshold_picks_the_score_with_the_best_f1():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    labels = np.array([0, 0, 1, 0, 1, 1])
    # t=0.5: tp 2, fp 0, fn 1 -> 0.8; t=0.3: tp 3, fp 1 -> 0.857; t=0.6: 0.5
    assert calibrate.f1_threshold(scores, labels) == pytest.approx(0.3)
    tied = np.array([0.3, 0.3, 0.9])  # a tie is one threshold: both or neither
    assert calibrate.f1_threshold(tied, np.array([0, 1, 1])) == pytest.approx(0.3)
    assert calibrate.f1_threshold(tied, np.array([0, 0, 1])) == pytest.approx(0.9)
    assert calibrate.f1_threshold(scores, np.zeros(6)) is None
    assert calibrate.f1_threshold(scores, np.ones(6)) is None


def test_display_range_runs_from_the_normal_median_to_a_high_quantile():
    normal = np.arange(11, dtype=np.float64)  # median 5
    everything = np.r_[normal, 100.0]
    low, high = calibrate.display_range(normal, everything, 0.5)
    assert (low, high) == (5.0, pytest.approx(np.quantile(everything, 0.5)))
    assert calibrate.display_range(normal, everything, 1.0)[1] == 100.0


def test_outliers_flag_a_score_far_above_the_rest_only():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.3, 0.01, 30)
    assert calibrate.outliers(scores, 0.999, 1.5).size == 0
    flagged = calibrate.outliers(np.r_[scores, 0.9], 0.999, 1.5)
    np.testing.assert_array_equal(flagged, [30])
    # without the IQR margin, the top of any set counts: the knob matters
    assert calibrate.outliers(scores, 0.999, 0.0).tolist() == [int(np.argmax(scores))]


def _scored(n_normal=50, seed=0):
    rng = np.random.default_rng(seed)
    normal_scores = rng.uniform(0.0, 0.5, n_normal)
    normal_pixels = rng.uniform(0.0, 0.4, n_normal * 64)
    labelled_scores = np.r_[rng.uniform(0.45, 1.0, 10), rng.uniform(0.0, 0.5, 10)]
    labelled_labels = np.r_[np.ones(10), np.zeros(10)]
    labelled_pixels = np.r_[rng.uniform(0.3, 1.0, 640), rng.uniform(0.0, 0.4, 640)]
    labelled_pixel_labels = np.r_[np.ones(640), np.zeros(640)]
    return calibrate.Scored(normal_scores, normal_pixels, labelled_scores, labelled_labels,
                            labelled_pixels, labelled_pixel_labels)


def test_thresholds_follow_each_knob():
    cfg = tiny_config(pathlib.Path("/unused")).calibrate
    scored = _scored()
    base = calibrate.thresholds(scored, cfg)
    assert base["image_threshold"] == pytest.approx(np.quantile(scored.normal_scores, 0.99))
    assert base["pixel_threshold"] == pytest.approx(np.quantile(scored.normal_pixels, 0.999))
    assert base["false_alarm_rate"] == pytest.approx(np.mean(
        scored.normal_scores >= base["image_threshold"]))
    assert base["normal_images"] == 50 and base["anomalous_images"] == 10
    assert base["f1"]["image"] is not None and base["f1"]["pixel"] is not None

    for field, key in (("image_fpr", "image_threshold"), ("pixel_fpr", "pixel_threshold")):
        changed = cfg.copy_and_resolve_references()
        changed[field] = 0.2
        other = "pixel_threshold" if key == "image_threshold" else "image_threshold"
        result = calibrate.thresholds(scored, changed)
        assert result[key] < base[key] and result[other] == base[other]

    f1 = cfg.copy_and_resolve_references()
    f1.policy = "f1"
    result = calibrate.thresholds(scored, f1)
    assert (result["image_threshold"], result["pixel_threshold"]) == (
        base["f1"]["image"], base["f1"]["pixel"])
    assert result["fpr"] == base["fpr"]

    wide = cfg.copy_and_resolve_references()
    wide.display_quantile = 0.5
    assert calibrate.thresholds(scored, wide)["display_range"][1] < base["display_range"][1]

    without_labels = calibrate.Scored(scored.normal_scores, scored.normal_pixels,
                                      *(np.zeros(0),) * 4)
    assert calibrate.thresholds(without_labels, cfg)["f1"] is None


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A params export of the tiny model, a synthetic set with 10 good train images per class,
    and a config that reads the export (no training needed)."""
    base = tmp_path_factory.mktemp("calibrate")
    data = synthetic.write_synthetic_dataset(base / "data", seed=3, n_train_good=10,
                                             n_test_good=2, n_test_defect_per_type=1).parent
    config = tiny_config(data)
    method = create_method(config, CLIPConfig(**config.model.random_arch.to_dict()))
    checkpoint.save_params(base / "params", method.init(jax.random.PRNGKey(3)))
    config.eval.params = str(base / "params")
    return base, data, config


def _scores(path: pathlib.Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_calibration_thresholds_are_the_quantiles_of_predicts_scores(setup, tmp_path, capsys):
    _, data, config = setup
    run = tmp_path / "run"
    path = calibrate.calibrate(config, str(run), str(data))
    assert path == run / "calibration.json"
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["class", "normal", "anomalous"]
    saved = json.loads(path.read_text())
    assert saved["provenance"]["config_hash"] == run_dir.config_hash(config)
    assert saved["provenance"]["images"] == {c: {"normal": 10, "anomalous": 0}
                                             for c in ("checker", "disc", "stripes")}
    assert saved["provenance"]["method"] == "anomalyclip"

    # the same images through predict, uncalibrated: the thresholds are their quantiles
    good = tmp_path / "good"
    for cls in ("checker", "disc", "stripes"):
        shutil.copytree(data / cls / "train" / "good", good / cls)
    scores_path = predict.predict_folder(config, str(tmp_path / "other_run"), str(good),
                                         str(tmp_path / "uncalibrated"))
    rows = _scores(scores_path)
    assert "decision" not in rows[0]
    for cls in ("checker", "disc", "stripes"):
        scores = np.array([float(r["image_score"]) for r in rows if r["class"] == cls])
        assert saved["classes"][cls]["image_threshold"] == pytest.approx(
            np.quantile(scores, 0.99), abs=2e-6)  # scores.csv rounds to 6 decimals
    all_scores = np.array([float(r["image_score"]) for r in rows])
    assert saved["global"]["image_threshold"] == pytest.approx(np.quantile(all_scores, 0.99),
                                                               abs=2e-6)
    value_range = json.loads((tmp_path / "uncalibrated" / "heatmaps" / "range.json").read_text())
    assert value_range["value_range"][1] == pytest.approx(
        max(float(r["pixel_max"]) for r in rows), abs=2e-6)

    with pytest.raises(FileExistsError, match="--overwrite"):
        calibrate.calibrate(config, str(run), str(data))
    calibrate.calibrate(config, str(run), str(data), overwrite=True)


def test_too_few_images_is_an_error_before_anything_is_written(setup, tmp_path):
    _, data, config = setup
    config = config.copy_and_resolve_references()
    config.calibrate.min_images = 11
    with pytest.raises(ValueError, match=r"class 'checker' \(10\).*calibrate\.min_images=11"):
        calibrate.calibrate(config, str(tmp_path / "run"), str(data))
    assert not (tmp_path / "run").exists()
    config.calibrate.policy = "f1"
    with pytest.raises(ValueError, match="needs labelled anomalous images"):
        calibrate.calibrate(config, str(tmp_path / "run"), str(data))


def test_fallback_uses_the_global_thresholds_with_one_warning(setup, tmp_path):
    _, data, config = setup
    config = config.copy_and_resolve_references()
    config.calibrate.min_images = 11
    config.calibrate.allow_fallback = True
    with pytest.warns(UserWarning, match="fewer than calibrate.min_images=11") as caught:
        path = calibrate.calibrate(config, str(tmp_path / "run"), str(data), str(data),
                                   out=str(tmp_path / "cal.json"))
    assert len([w for w in caught if "min_images" in str(w.message)]) == 1
    saved = json.loads(path.read_text())
    for entry in saved["classes"].values():
        assert entry["fallback"] and entry["image_threshold"] == saved["global"][
            "image_threshold"]
    assert saved["global"]["f1"]["image"] is not None  # the test split gave labelled images
    assert saved["provenance"]["images"]["disc"]["anomalous"] == 4  # 2 good, 4 defect types


def test_few_shot_references_are_left_out_of_the_calibration(setup, tmp_path):
    _, data, config = setup
    config = config.copy_and_resolve_references()
    config.fewshot.k, config.fewshot.reference = 3, str(data)
    config.calibrate.min_images = 7
    with pytest.warns(UserWarning, match=r"9 image\(s\) are few-shot references of their "
                                         r"class \(fewshot\.\*\) and are left out"):
        path = calibrate.calibrate(config, str(tmp_path / "run"), str(data))
    saved = json.loads(path.read_text())
    assert saved["provenance"]["images"] == {c: {"normal": 7, "anomalous": 0}
                                             for c in ("checker", "disc", "stripes")}
    assert saved["provenance"]["config_hash"] == run_dir.config_hash(config)
    config.fewshot.k = 10
    with pytest.raises(ValueError, match=r"every image is a few-shot reference"):
        calibrate.calibrate(config, str(tmp_path / "run2"), str(data))
    assert not (tmp_path / "run2").exists()


@pytest.fixture(scope="module")
def calibrated(setup):
    base, data, config = setup
    run = base / "run"
    calibrate.calibrate(config, str(run), str(data))
    return run


def _odd_sized_folder(data: pathlib.Path, folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    """disc's test images at sizes other than the model's: {relative path: (width, height)}."""
    sizes = {}
    for i, source in enumerate(sorted((data / "disc" / "test").rglob("*.png"))[:4]):
        size = (150 + 10 * i, 100)
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(source).convert("RGB").resize(size).save(folder / f"part{i}.png")
        sizes[f"part{i}.png"] = size
    return sizes


def test_predict_decides_by_the_class_threshold_and_writes_masks_at_input_size(
    setup, calibrated, tmp_path, capsys
):
    _, data, config = setup
    sizes = _odd_sized_folder(data, tmp_path / "images")
    saved = json.loads((calibrated / "calibration.json").read_text())
    entry = saved["classes"]["disc"]
    path = predict.predict_folder(config, str(calibrated), str(tmp_path / "images"),
                                  str(tmp_path / "out"), class_name="disc")
    out = capsys.readouterr().out
    rows = _scores(path)
    assert list(rows[0]) == ["image", "class", "image_score", "pixel_max", "threshold",
                             "decision", "heatmap", "mask"]
    assert len(rows) == 4
    for row in rows:
        assert row["class"] == "disc"
        assert float(row["threshold"]) == pytest.approx(entry["image_threshold"], abs=1e-6)
        expected = "anomalous" if float(row["image_score"]) >= entry["image_threshold"] else (
            "normal")
        assert row["decision"] == expected
        mask = np.asarray(Image.open(tmp_path / "out" / row["mask"]))
        assert mask.shape == sizes[row["image"]][::-1] and set(np.unique(mask)) <= {0, 255}
        panel = Image.open(tmp_path / "out" / row["heatmap"])
        assert panel.size == (2 * 112 + 64, 112 + 16)  # image, overlay, colour bar; caption
    anomalous = sum(r["decision"] == "anomalous" for r in rows)
    assert f"4 images scored, {anomalous} anomalous, 0 skipped" in out

    jsonl = predict.predict_folder(config, str(calibrated), str(tmp_path / "images" /
                                                                 "part0.png"),
                                   str(tmp_path / "one"), class_name="disc",
                                   output_format="jsonl")
    [record] = [json.loads(line) for line in jsonl.read_text().splitlines()]
    mask = np.asarray(Image.open(tmp_path / "one" / record["mask"])) > 0
    assert record["defect_area"] == int(mask.sum())
    for x0, y0, x1, y1 in record["boxes"]:
        assert mask[y0:y1 + 1, x0:x1 + 1].any()
    assert sum(mask[y0:y1 + 1, x0:x1 + 1].sum() for x0, y0, x1, y1 in record["boxes"]) >= (
        record["defect_area"])
    assert record["image_score"] == pytest.approx(
        float(next(r for r in rows if r["image"] == "part0.png")["image_score"]), abs=1e-6)


def test_defect_mask_is_the_resized_map_at_the_pixel_threshold():
    anomaly_map = np.zeros((4, 4), np.float32)
    anomaly_map[1:3, 1:3] = 1.0
    mask = predict.defect_mask(anomaly_map, (8, 8), 0.5)
    assert mask.shape == (8, 8) and mask[3:5, 3:5].all() and not mask[0].any()
    assert predict.defect_mask(anomaly_map, (8, 8), 0.99).sum() < mask.sum()
    area, boxes = predict.defect_regions(np.pad(np.ones((2, 3), bool), ((1, 5), (2, 0))))
    assert (area, boxes) == (6, [[2, 1, 4, 2]])


def test_an_unknown_class_uses_the_global_threshold_with_one_warning(setup, calibrated,
                                                                      tmp_path):
    _, data, config = setup
    _odd_sized_folder(data, tmp_path / "images" / "bolt")
    saved = json.loads((calibrated / "calibration.json").read_text())
    with pytest.warns(UserWarning, match="no calibration for class 'bolt'") as caught:
        path = predict.predict_folder(config, str(calibrated), str(tmp_path / "images"),
                                      str(tmp_path / "out"))
    assert len([w for w in caught if "bolt" in str(w.message)]) == 1
    for row in _scores(path):
        assert row["class"] == "bolt"
        assert float(row["threshold"]) == pytest.approx(saved["global"]["image_threshold"],
                                                        abs=1e-6)


def test_a_calibration_of_another_model_is_refused_naming_both_hashes(setup, calibrated,
                                                                       tmp_path):
    _, data, config = setup
    _odd_sized_folder(data, tmp_path / "images")
    other = config.copy_and_resolve_references()
    other.anomalyclip.sigma = 2.0  # another map blur: other scores
    stored = json.loads((calibrated / "calibration.json").read_text())["provenance"][
        "config_hash"]
    expected = run_dir.config_hash(other)
    with pytest.raises(ValueError, match=rf"config hash {stored}\).*is {expected}"):
        predict.predict_folder(other, str(calibrated), str(tmp_path / "images"),
                               str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
