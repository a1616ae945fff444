"""Ablation runner: sweep parsing and validation, seed aggregation, a tiny end-to-end sweep."""

from __future__ import annotations

import json
import math
import re

import pytest

from genclip_jax import ablate, defaults, evaluate, train
from genclip_jax.backbone import load_backbone
from genclip_jax.data.synthetic import write_synthetic_dataset


def test_split_sweep_keeps_commas_inside_brackets():
    assert ablate.split_sweep("gqp_only, genclip.layers=[6,12] ,mvp,") == [
        "gqp_only", "genclip.layers=[6,12]", "mvp"]


def test_parse_items():
    named = ablate.parse_item("dual_branch")
    assert named == ablate.Variant("dual_branch", ablate.VARIANTS["dual_branch"])
    combined = ablate.parse_item("mvp+genclip.gqp_len=2;genclip.fusion_w=0.3")
    assert combined.overrides == {**ablate.VARIANTS["mvp"], "genclip.gqp_len": "2",
                                  "genclip.fusion_w": "0.3"}
    assert combined.name == "mvp_genclip.gqp_len=2_genclip.fusion_w=0.3"
    for bad in ("", "mvp+", "no_such_variant", "mvp+fusion"):
        with pytest.raises(ValueError, match="sweep item"):
            ablate.parse_item(bad)


def test_apply_overrides_parses_values_by_field_type():
    base = defaults.tiny_config("genclip")
    cfg = ablate.apply_overrides(base, {
        "genclip.fusion_w": "0", "genclip.mvp_bias": "false", "genclip.cnf.rule": "A'",
        "genclip.layers": "[12, 24]", "genclip.use_mvp": "False", "train.epochs": 1,
    })
    assert cfg.genclip.fusion_w == 0.0 and isinstance(cfg.genclip.fusion_w, float)
    assert cfg.genclip.mvp_bias is False and cfg.genclip.use_mvp is False
    assert cfg.genclip.cnf.rule == "A'" and list(cfg.genclip.layers) == [12, 24]
    assert cfg.train.epochs == 1 and base.train.epochs == 2  # the base config is untouched


@pytest.mark.parametrize("field", ["genclip.no_such_field", "nothing.at_all", "genclip.cnf.x.y"])
def test_unknown_field_raises_naming_it(field):
    with pytest.raises(ValueError, match=re.escape(f"unknown config field '{field}'")):
        ablate.apply_overrides(defaults.tiny_config("genclip"), {field: "1"})


def test_wrong_type_raises_naming_the_field():
    with pytest.raises(ValueError, match=r"'genclip\.fusion_w'"):
        ablate.apply_overrides(defaults.tiny_config("genclip"), {"genclip.fusion_w": "high"})


def test_bad_sweep_fails_before_training(tmp_path):
    config = defaults.tiny_config("genclip")
    config.data.test_root = str(tmp_path / "data")
    with pytest.raises(ValueError, match=r"genclip\.bogus"):
        ablate.run_ablation(config, str(tmp_path / "out"), ["mvp", "genclip.bogus=1"])
    assert not (tmp_path / "out" / "mvp").exists()
    with pytest.raises(ValueError, match="variant names repeat"):
        ablate.run_ablation(config, str(tmp_path / "out"), ["mvp", " mvp"])


def test_summarize_averages_classes_then_seeds():
    nan = float("nan")
    runs = {
        0: {"a": {"m": 0.5, "n": nan}, "b": {"m": 1.0, "n": 0.2}},
        1: {"a": {"m": 0.7, "n": 0.4}, "b": {"m": 0.8, "n": 0.6}},
    }
    with pytest.warns(UserWarning, match="NaN for classes"):
        entry = ablate.summarize(ablate.Variant("v", {"x": 1}), runs)
    assert entry["seeds"] == [0, 1]
    assert entry["per_seed"]["0"] == {"m": 0.75, "n": 0.2}
    assert entry["mean"] == pytest.approx({"m": 0.75, "n": 0.35})
    assert entry["std"]["m"] == 0.0 and entry["std"]["n"] == pytest.approx(math.sqrt(0.045))
    assert entry["classes"]["a"] == pytest.approx({"m": 0.6, "n": 0.4})
    texts = ablate.render({"v": entry})
    assert "| v | 0,1 | 75.0 ± 0.0 | 35.0 ± 21.2 |" in texts["md"]
    assert json.loads(texts["json"])["variants"]["v"]["classes"]["a"]["m"] == pytest.approx(0.6)


def test_tiny_end_to_end_ablation(tmp_path, monkeypatch):
    # The frozen backbone is the same for every run: build it once for train and evaluate.
    built = {}

    def cached_backbone(model_cfg):
        key = model_cfg.to_json()
        if key not in built:
            built[key] = load_backbone(model_cfg)
        return built[key]

    monkeypatch.setattr(train, "load_backbone", cached_backbone)
    monkeypatch.setattr(evaluate, "load_backbone", cached_backbone)
    data = tmp_path / "data"
    write_synthetic_dataset(data, classes=("disc",), defects=("spot", "scratch"), image_size=56,
                            n_train_good=1, n_test_good=2, n_test_defect_per_type=1)
    config = defaults.tiny_config("genclip")
    config.model.image_size = 56
    config.genclip.gqp_len = 2
    config.genclip.state_len = 2
    config.train.epochs = 1
    config.train.progress = False
    config.eval.heatmaps_per_class = 0
    config.eval.metrics = ["image_auroc", "pixel_auroc"]
    config.data.train_root = config.data.test_root = str(data)
    out = tmp_path / "ablation"

    result = ablate.run_ablation(config, str(out), ["gqp_only", "dual_branch"], seeds=[0])

    assert set(result["variants"]) == {"gqp_only", "dual_branch"}
    assert result["metrics"] == ["image_auroc", "pixel_auroc"]
    for name, entry in result["variants"].items():
        assert entry["seeds"] == [0] and set(entry["classes"]) == {"disc"}
        assert all(0.0 <= v <= 1.0 for v in entry["mean"].values())
        assert (out / name / "seed0" / "eval" / "metrics.json").is_file()
    assert json.loads((out / "ablation.json").read_text()) == result
    md = (out / "ablation.md").read_text()
    assert md.splitlines()[0] == "| variant | seeds | image_auroc | pixel_auroc |"
    assert (out / "ablation.csv").read_text().startswith(
        "variant,seeds,image_auroc,pixel_auroc,image_auroc_std,pixel_auroc_std\n")
    assert not list(out.glob(".ablation.*"))  # no temporary files left behind
