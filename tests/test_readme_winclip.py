"""README's WinCLIP block, run verbatim: zero- and few-shot evaluation, calibration and
decisions without training (a module of its own, so pytest-xdist runs it beside the README's
other chains)."""

from __future__ import annotations

import csv
import json

from test_readme import _block_after, _run


def test_winclip_zero_and_few_shot_without_training(tmp_path):
    commands = _block_after("<!-- tests/test_readme_winclip.py runs this WinCLIP block verbatim")
    assert [c.split()[1] for c in commands] == ["synthetic", "eval", "eval", "calibrate",
                                                "predict"]
    root = tmp_path / "winclip"
    _run(commands, {"/tmp/winclip_try": str(root)})
    run = root / "run"
    assert not (run / "checkpoints").exists() and not (run / "config.json").exists()
    zero = json.loads((run / "eval" / "data" / "metrics.json").read_text())
    four = json.loads((run / "eval" / "four_shot" / "metrics_4shot_seed0.json").read_text())
    assert zero["classes"].keys() == four["classes"].keys() == {"checker", "disc", "stripes"}
    assert zero["classes"] != four["classes"]  # the references changed the scores
    four_shot = json.loads((run / "eval" / "four_shot" / "eval.json").read_text())
    assert four_shot["config"]["fewshot"]["k"] == 4
    threshold = json.loads((run / "calibration.json").read_text())["classes"]["disc"][
        "image_threshold"]
    with (root / "predictions" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list((root / "data" / "disc" / "test").rglob("*.png")))
    for r in rows:
        assert r["decision"] == ("anomalous" if float(r["image_score"]) >= threshold else "normal")
