"""The protocol runner: train per seed on a source set, evaluate on targets, Table 1, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from train_helpers import tiny_config

from genclip_jax import defaults, evaluate, metrics, protocol, train
from genclip_jax.data import synthetic


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("protocol")
    return {name: str(synthetic.write_synthetic_dataset(base / name, seed=seed).parent)
            for name, seed in (("alpha", 0), ("beta", 1))}


def test_parse_roots_names_the_bad_item():
    assert protocol.parse_roots(["a=/x", "b=/y=z"]) == {"a": "/x", "b": "/y=z"}
    with pytest.raises(ValueError, match="name=path items, got 'nope'"):
        protocol.parse_roots(["nope"])
    with pytest.raises(ValueError, match="'a' is given twice"):
        protocol.parse_roots(["a=/x", "a=/y"])


def test_bad_names_fail_before_anything_is_written(sets, tmp_path):
    config = tiny_config(sets["alpha"])
    with pytest.raises(ValueError, match=r"no root for \['gamma'\]"):
        protocol.run_protocol(config, str(tmp_path / "w"), "alpha", ["gamma"], sets)
    with pytest.raises(FileNotFoundError, match=r"empty=.* has no meta\.json"):
        protocol.run_protocol(config, str(tmp_path / "w"), "alpha", ["empty"],
                              {**sets, "empty": str(tmp_path)})
    assert not (tmp_path / "w").exists()


def test_two_seeds_two_targets_table_and_resume(sets, tmp_path, monkeypatch, capsys):
    config = tiny_config(sets["alpha"])
    config.train.epochs = 1
    work = tmp_path / "table"
    doc = protocol.run_protocol(config, str(work), "alpha", ["beta", "alpha"], sets, [111, 112])
    assert doc["metrics"] == list(protocol.PAPER_METRICS)
    assert list(doc["variants"]) == ["beta", "alpha"]
    for target, entry in doc["variants"].items():
        per_seed = [metrics.class_mean(json.loads(
            (work / f"seed{s}" / "eval" / target / "metrics.json").read_text())["classes"])
            for s in (111, 112)]
        for m in protocol.PAPER_METRICS:
            values = [row[m] for row in per_seed]
            assert entry["mean"][m] == pytest.approx(np.mean(values))
            assert entry["std"][m] == pytest.approx(np.std(values, ddof=1))
    # the seeds trained differently: the table's std is not zero everywhere
    assert any(e["std"][m] > 0 for e in doc["variants"].values() for m in e["std"])
    md = (work / "protocol.md").read_text()
    assert md.startswith("| dataset | seeds | image_auroc | image_ap | pixel_auroc | pixel_aupro |")
    assert "| beta | 111,112 | " in md and " ± " in md
    classes = (work / "classes" / "beta.md").read_text()
    assert {"| checker |", "| disc |", "| stripes |"} <= {
        line.split(" 111")[0].rstrip() for line in classes.splitlines()}
    assert "protocol table:" in capsys.readouterr().out

    # A rerun keeps every finished cell: nothing trains or evaluates again.
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("retrained"))
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("re-evaluated"))
    again = protocol.run_protocol(config, str(work), "alpha", ["beta", "alpha"], sets,
                                  [111, 112])
    assert json.dumps(again, sort_keys=True) == json.dumps(doc, sort_keys=True)

    # A lost cell is recomputed from the finished training, without training again.
    (work / "seed112" / "cells" / "beta.json").unlink()
    evaluated = []
    monkeypatch.setattr(evaluate, "evaluate", lambda c, w, out=None: evaluated.append(out) or
                        json.loads((work / "seed112" / "eval" / "beta" / "metrics.json")
                                   .read_text())["classes"])
    protocol.run_protocol(config, str(work), "alpha", ["beta"], sets, [111, 112])
    assert evaluated == [str(work / "seed112" / "eval" / "beta")]
    assert not math.isnan(json.loads((work / "protocol.json").read_text())["variants"]["beta"][
        "mean"]["image_auroc"])

    # --shots adds k-shot cells to the finished runs: references drawn from the target's train
    # split with fewshot.seed = the seed; no training again, the zero-shot cells kept.
    monkeypatch.undo()
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("retrained"))
    few = protocol.run_protocol(config, str(work), "alpha", ["beta"], sets, [111, 112], [0, 2])
    assert list(few["variants"]) == ["beta", "beta 2-shot"]
    for s in (111, 112):
        out = work / f"seed{s}" / "eval" / "beta_2shot"
        recorded = json.loads((out / "eval.json").read_text())["config"]["fewshot"]
        assert (recorded["k"], recorded["seed"], recorded["reference"]) == (2, s, sets["beta"])
        rows = json.loads((out / f"metrics_2shot_seed{s}.json").read_text())["classes"]
        assert json.loads((work / f"seed{s}" / "cells" / "beta_2shot.json").read_text())[
            "rows"] == rows
    assert few["variants"]["beta"] == doc["variants"]["beta"]
    assert few["variants"]["beta 2-shot"]["mean"] != few["variants"]["beta"]["mean"]
    assert "| beta 2-shot | 111,112 | " in (work / "protocol.md").read_text()
    assert (work / "classes" / "beta_2shot.md").is_file()


def test_too_many_shots_fail_before_anything_is_written(sets, tmp_path):
    config = tiny_config(sets["alpha"])
    with pytest.raises(ValueError, match=r"--shots=1000, target beta: .*class 'checker' has "
                                         r"\d+ normal reference images, fewer than "
                                         r"fewshot\.k=1000"):
        protocol.run_protocol(config, str(tmp_path / "w"), "alpha", ["beta"], sets, [0],
                              [0, 1000])
    with pytest.raises(ValueError, match=r"--shots: expected distinct numbers"):
        protocol.run_protocol(config, str(tmp_path / "w"), "alpha", ["beta"], sets, [0],
                              [2, 2])
    assert not (tmp_path / "w").exists()


def test_a_training_free_method_is_evaluated_once_without_training(sets, tmp_path, monkeypatch):
    config = defaults.tiny_config("winclip")
    config.train.progress = False
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("winclip was trained"))
    work = tmp_path / "winclip"
    doc = protocol.run_protocol(config, str(work), "alpha", ["beta"], sets, [111, 112])
    assert not (work / "seed112").exists()  # nothing depends on the seed
    assert not (work / "seed111" / "checkpoints").exists()
    assert not (work / "seed111" / protocol.TRAINED_FILE).exists()
    entry = doc["variants"]["beta"]
    assert entry["seeds"] == [111]
    table = json.loads((work / "seed111" / "eval" / "beta" / "metrics.json").read_text())
    mean = metrics.class_mean(table["classes"])
    for m in protocol.PAPER_METRICS:
        assert entry["mean"][m] == pytest.approx(mean[m])
    assert "| beta | 111 | " in (work / "protocol.md").read_text()
