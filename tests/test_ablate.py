"""Ablation runner: sweep parsing and validation, seed aggregation, a tiny end-to-end sweep."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import re

import pytest

from genclip_jax import ablate, defaults, evaluate, train, train_eval
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


def test_tiny_end_to_end_ablation(tmp_path, monkeypatch, capsys):
    # The frozen backbone is the same for every run: build it once for train and evaluate.
    built = {}

    def cached_backbone(model_cfg, check=None):
        key = model_cfg.to_json()
        if key not in built:
            built[key] = load_backbone(model_cfg)
        if check is not None:
            check(built[key][0])
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
        assert list((out / name / "seed0" / "eval").rglob("metrics.json"))
    assert json.loads((out / "ablation.json").read_text()) == result
    md = (out / "ablation.md").read_text()
    assert md.splitlines()[0] == "| variant | seeds | image_auroc | pixel_auroc |"
    assert (out / "ablation.csv").read_text().startswith(
        "variant,seeds,image_auroc,pixel_auroc,image_auroc_std,pixel_auroc_std\n")
    assert not list(out.glob(".ablation.*"))  # no temporary files left behind
    cell = json.loads((out / "gqp_only" / "seed0" / ablate.CELL_FILE).read_text())
    assert cell == {"variant": "gqp_only", "overrides": ablate.VARIANTS["gqp_only"], "seed": 0,
                    "test_root": str(data), "rows": result["variants"]["gqp_only"]["classes"]}
    assert capsys.readouterr().out.endswith(f"{md}\nablation table: {out / 'ablation.md'}\n")

    # The same sweep again: every cell is finished, nothing trains, the table is the same.
    tables = {p.name: p.read_text() for p in out.glob("ablation.*")}
    monkeypatch.setattr(train_eval, "train_and_evaluate", lambda *a: pytest.fail("retrained"))
    assert ablate.run_ablation(config, str(out), ["gqp_only", "dual_branch"], [0]) == result
    assert {p.name: p.read_text() for p in out.glob("ablation.*")} == tables


def _fake_training(monkeypatch) -> list[str]:
    """Training replaced by fixed rows per (variant, seed); returns the runs it was asked for.

    Image AUROC of class 'a' = 0.5 + 0.1 seed + 0.01 (MVP) + 0.02 (CNF rule B), class 'b' that
    + 0.2; pixel AUROC 0.9 for both.
    """
    calls = []

    def fake(config, workdir):
        run = pathlib.Path(workdir)
        calls.append(f"{run.parent.name}/{run.name}")
        a = (0.5 + 0.1 * config.train.seed + 0.01 * config.genclip.use_mvp
             + 0.02 * (config.genclip.cnf.rule == "B"))
        return {"a": {"image_auroc": a, "pixel_auroc": 0.9},
                "b": {"image_auroc": a + 0.2, "pixel_auroc": 0.9}}

    monkeypatch.setattr(train_eval, "train_and_evaluate", fake)
    return calls


def _config(tmp_path):
    config = defaults.tiny_config("genclip")
    config.data.test_root = str(tmp_path / "data")
    return config


def _tables(out) -> dict[str, str]:
    return {ext: (out / f"ablation.{ext}").read_text() for ext in ("md", "csv", "json")}


def test_rerun_of_the_same_sweep_trains_nothing(tmp_path, monkeypatch, caplog):
    calls = _fake_training(monkeypatch)
    out = tmp_path / "out"
    first = ablate.run_ablation(_config(tmp_path), str(out), ["gqp_only", "mvp"], [0, 1])
    assert calls == ["gqp_only/seed0", "gqp_only/seed1", "mvp/seed0", "mvp/seed1"]
    tables = _tables(out)
    with caplog.at_level(logging.INFO):
        again = ablate.run_ablation(_config(tmp_path), str(out), ["gqp_only", "mvp"], [0, 1])
    assert len(calls) == 4 and again == first and _tables(out) == tables
    kept = [m for m in caplog.messages if m.startswith("ablation: kept")]
    assert kept == [f"ablation: kept the finished run {out}/{run}/{ablate.CELL_FILE}"
                    for run in calls]


def test_rerun_of_a_subset_keeps_the_other_rows(tmp_path, monkeypatch, capsys):
    calls = _fake_training(monkeypatch)
    out = tmp_path / "out"
    ablate.run_ablation(_config(tmp_path), str(out), ["gqp_only", "mvp", "cnf"], [0])
    # Rows not in the next sweep are kept as written, not recomputed from their cells.
    doc = json.loads((out / "ablation.json").read_text())
    doc["variants"]["gqp_only"]["mean"]["image_auroc"] = 0.123
    (out / "ablation.json").write_text(json.dumps(doc))
    capsys.readouterr()

    result = ablate.run_ablation(_config(tmp_path), str(out), ["cnf", "dual_branch"], [0])

    assert calls == ["gqp_only/seed0", "mvp/seed0", "cnf/seed0", "dual_branch/seed0"]
    assert list(result["variants"]) == ["gqp_only", "mvp", "cnf", "dual_branch"]
    assert result["variants"]["gqp_only"] == doc["variants"]["gqp_only"]
    assert result["variants"]["mvp"] == doc["variants"]["mvp"]
    assert result["variants"]["dual_branch"]["mean"] == pytest.approx(
        {"image_auroc": 0.63, "pixel_auroc": 0.9})
    md = _tables(out)["md"]
    assert md.splitlines()[2:] == [
        "| gqp_only | 0 | 12.3 | 90.0 |", "| mvp | 0 | 61.0 | 90.0 |",
        "| cnf | 0 | 63.0 | 90.0 |", "| dual_branch | 0 | 63.0 | 90.0 |"]
    assert capsys.readouterr().out == f"{md}\nablation table: {out / 'ablation.md'}\n"


def test_rerun_with_a_new_seed_trains_only_that_seed(tmp_path, monkeypatch):
    calls = _fake_training(monkeypatch)
    out = tmp_path / "out"
    ablate.run_ablation(_config(tmp_path), str(out), ["mvp"], [0])
    # A NaN metric goes through the cell file as null and comes back as NaN.
    cell = out / "mvp" / "seed0" / ablate.CELL_FILE
    written = json.loads(cell.read_text())
    written["rows"]["b"]["pixel_auroc"] = None
    cell.write_text(json.dumps(written))

    with pytest.warns(UserWarning, match="pixel_auroc is NaN for classes"):
        result = ablate.run_ablation(_config(tmp_path), str(out), ["mvp"], [1])

    assert calls == ["mvp/seed0", "mvp/seed1"]
    entry = result["variants"]["mvp"]
    assert entry["seeds"] == [0, 1]
    assert entry["per_seed"] == {"0": pytest.approx({"image_auroc": 0.61, "pixel_auroc": 0.9}),
                                 "1": pytest.approx({"image_auroc": 0.71, "pixel_auroc": 0.9})}
    assert entry["mean"] == pytest.approx({"image_auroc": 0.66, "pixel_auroc": 0.9})
    assert entry["std"] == pytest.approx({"image_auroc": math.sqrt(0.005), "pixel_auroc": 0.0})
    assert entry["classes"]["b"] == pytest.approx({"image_auroc": 0.76, "pixel_auroc": 0.9})
    assert "| mvp | 0,1 | 66.0 ± 7.1 | 90.0 ± 0.0 |" in _tables(out)["md"]
    assert json.loads((out / "mvp" / "seed1" / ablate.CELL_FILE).read_text()) == {
        "variant": "mvp", "overrides": ablate.VARIANTS["mvp"], "seed": 1,
        "test_root": str(tmp_path / "data"),
        "rows": {"a": {"image_auroc": pytest.approx(0.61), "pixel_auroc": 0.9},
                 "b": {"image_auroc": pytest.approx(0.81), "pixel_auroc": 0.9}}}


def test_changed_settings_fail_before_any_training(tmp_path, monkeypatch):
    calls = _fake_training(monkeypatch)
    out = tmp_path / "out"
    ablate.run_ablation(_config(tmp_path), str(out), ["mvp"], [0])
    monkeypatch.setitem(ablate.VARIANTS, "mvp", {**ablate.VARIANTS["mvp"],
                                                 "genclip.fusion_w": 0.7})
    with pytest.raises(ValueError, match=re.escape(
            f"{out / 'ablation.json'}: variant 'mvp' has other overrides there than in the sweep "
            "now (genclip.fusion_w: 1.0 -> 0.7)")):
        ablate.run_ablation(_config(tmp_path), str(out), ["gqp_only", "mvp"], [0])
    (out / "ablation.json").unlink()
    cell = out / "mvp" / "seed0" / ablate.CELL_FILE
    with pytest.raises(ValueError, match=re.escape(
            f"{cell}: this run of 'mvp' has other overrides than the sweep now "
            "(genclip.fusion_w: 1.0 -> 0.7)")):
        ablate.run_ablation(_config(tmp_path), str(out), ["gqp_only", "mvp"], [1])
    monkeypatch.undo()
    _fake_training(monkeypatch).extend(calls)
    other_data = _config(tmp_path)
    other_data.data.test_root = str(tmp_path / "other")
    with pytest.raises(ValueError, match=re.escape(
            f"{cell}: this run was evaluated on test_root '{tmp_path / 'data'}', the sweep now "
            f"on '{tmp_path / 'other'}'")):
        ablate.run_ablation(other_data, str(out), ["gqp_only", "mvp"], [0])
    assert calls == ["mvp/seed0"] and not (out / "gqp_only").exists()


def test_text_overrides_compare_by_value(tmp_path, monkeypatch):
    calls = _fake_training(monkeypatch)
    out = tmp_path / "out"
    ablate.run_ablation(_config(tmp_path), str(out), ["genclip.layers=[6,12]"], [0])
    ablate.run_ablation(_config(tmp_path), str(out), ["genclip.layers=[6, 12]"], [0])
    assert calls == ["genclip.layers=_6_12_/seed0"]


@pytest.mark.parametrize("name, text, expected", [
    ("ablation.json", "{not json", "expected JSON"),
    ("ablation.json", '{"variants": {"mvp": {"seeds": [0]}}}', "variant 'mvp': expected an entry"),
    ("mvp/seed0/ablation_cell.json", '{"variant": "mvp"}', "expected an ablation cell"),
])
def test_malformed_files_are_named(tmp_path, monkeypatch, name, text, expected):
    calls = _fake_training(monkeypatch)
    path = tmp_path / "out" / name
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {expected}")):
        ablate.run_ablation(_config(tmp_path), str(tmp_path / "out"), ["mvp"], [0])
    assert calls == []


def test_a_training_free_row_is_evaluated_once_without_training(tmp_path, monkeypatch):
    """`method=winclip` in a sweep: the training-free baseline row beside trained variants."""
    def no_training(*args, **kwargs):
        raise AssertionError("a training-free variant must not train")

    monkeypatch.setattr(train_eval, "train_and_evaluate", no_training)
    data = tmp_path / "data"
    write_synthetic_dataset(data, classes=("disc",), defects=("spot",), image_size=56,
                            n_train_good=1, n_test_good=2, n_test_defect_per_type=1)
    config = defaults.tiny_config("anomalyclip")
    config.model.image_size = 56
    config.train.progress = False
    config.eval.heatmaps_per_class = 0
    config.eval.metrics = ["image_auroc", "pixel_auroc"]
    config.data.train_root = config.data.test_root = str(data)
    out = tmp_path / "ablation"

    result = ablate.run_ablation(config, str(out), ["method=winclip+model.activation=gelu"],
                                 seeds=[3, 4])

    [(name, entry)] = result["variants"].items()
    assert entry["seeds"] == [3] and set(entry["classes"]) == {"disc"}
    assert (out / name / "seed3" / "eval" / "data" / "metrics.json").is_file()
    assert not (out / name / "seed4").exists()
    assert not (out / name / "seed3" / "checkpoints").exists()
