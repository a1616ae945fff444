"""README "Train on your own data": the three cases (full masks, labels without masks, normal
images only) run verbatim, in the README's order, on folders built from the synthetic set."""

from __future__ import annotations

import json
import math
import pathlib

from test_readme import _BLOCK, README, _commands, _run

MARKER = "<!-- tests/test_readme_own_data.py runs the blocks of this section verbatim -->"


def _section_blocks() -> list[list[str]]:
    start = README.index(MARKER)
    end = README.index("\n## ", start)
    return [_commands(m[1]) for m in _BLOCK.finditer(README, start, end)]


def _metrics(run: pathlib.Path, target: str) -> dict:
    return json.loads((run / "eval" / target / "metrics.json").read_text())


def _defects(root: pathlib.Path) -> list[dict]:
    meta = json.loads((root / "meta.json").read_text())
    return [s for split in meta.values() for samples in split.values() for s in samples
            if s["anomaly"]]


def test_the_three_cases_train_and_evaluate_as_written(tmp_path):
    masked, labelled, normal = _section_blocks()
    classes = {"checker", "disc", "stripes"}

    _run(masked, {"/tmp/genclip_own": str(tmp_path)})
    defects = _defects(tmp_path / "masked")
    assert defects and all(d["mask_path"] for d in defects)
    table = _metrics(tmp_path / "run_masked", "masked")
    assert table["classes"].keys() == classes
    assert all(math.isfinite(row["pixel_auroc"]) for row in table["classes"].values())
    assert "defective_with_mask" not in table["mean"]  # every defect has its mask

    _run(labelled, {"/tmp/genclip_own": str(tmp_path)})
    defects = _defects(tmp_path / "labelled")
    assert defects and not any(d["mask_path"] for d in defects)
    table = _metrics(tmp_path / "run_labelled", "labelled")
    for row in table["classes"].values():
        assert math.isfinite(row["image_auroc"]) and row["pixel_auroc"] is None
        assert (row["defective"], row["defective_with_mask"]) == (2, 0)
    saved = json.loads((tmp_path / "run_labelled" / "config.json").read_text())
    assert saved["data"]["missing_mask"] == "ignore"

    _run(normal, {"/tmp/genclip_own": str(tmp_path)})
    assert not _defects(tmp_path / "normal")
    meta = json.loads((tmp_path / "normal" / "meta.json").read_text())
    assert not any(meta["test"].values()) and all(meta["train"][c] for c in classes)
    saved = json.loads((tmp_path / "run_normal" / "config.json").read_text())
    assert saved["train"]["synthetic_anomalies"] is True
    table = _metrics(tmp_path / "run_normal", "masked")
    assert table["classes"].keys() == classes
    assert all(math.isfinite(row["pixel_auroc"]) for row in table["classes"].values())
