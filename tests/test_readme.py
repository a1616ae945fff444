"""The README's commands, run as written: the demo (main job) and the whole path on synthetic data
(train, then eval on another target, then predict). Only their /tmp folders move to a temp dir."""

from __future__ import annotations

import csv
import json
import pathlib
import re
import subprocess
import sys

import pytest
from train_helpers import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
_BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)


def _commands(block: str) -> list[str]:
    """Shell commands of a fenced block, continuation lines joined, comments dropped."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines()
            if c.strip() and not c.lstrip().startswith("#")]


def _block_after(marker: str) -> list[str]:
    start = README.index(marker)
    return _commands(_BLOCK.search(README, start)[1])


def _run(commands: list[str], replace: dict[str, str]) -> None:
    for command in commands:
        for old, new in replace.items():
            command = command.replace(old, new)
        result = subprocess.run(["bash", "-c", command], cwd=REPO, env=subprocess_env(),
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}{result.stderr[-4000:]}"


def _run_python(marker: str, replace: dict[str, str]) -> str:
    """Runs the README's Python block after `marker` (its folders replaced); its stdout."""
    code = re.compile(r"```python\n(.*?)```", re.DOTALL).search(README, README.index(marker))[1]
    for old, new in replace.items():
        code = code.replace(old, new)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_set_up_commands_are_the_ci_commands():
    ci = (REPO / ".ci" / "run").read_text()
    [tests] = _block_after("**Tests**")
    assert tests in ci
    [demo] = _block_after("**Main job**")
    assert demo == "pip install -e . && genclip-jax demo --config=configs/tiny.py " \
                   "--workdir=/tmp/genclip_demo"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> pathlib.Path:
    """The README's main job, run as written (but for its folder)."""
    [command] = _block_after("**Main job**")
    workdir = tmp_path_factory.mktemp("readme") / "demo"
    # CI installed the package already (the README's test command): run the demo part.
    _run([command.split(" && ", 1)[1]], {"/tmp/genclip_demo": str(workdir)})
    return workdir


def test_the_demo_writes_what_the_readme_promises(demo):
    out = demo / "eval" / "data"
    for name in ("metrics.md", "metrics.csv", "metrics.json"):
        assert (out / name).is_file(), f"the README promises {out / name}"
    assert json.loads((out / "metrics.json").read_text())["classes"].keys() == {
        "checker", "disc", "stripes"}
    assert list((out / "heatmaps").rglob("*.png"))
    assert list((demo / "logs").glob("events.out.tfevents.*"))


def test_the_python_example_runs_on_the_demo_run(demo):
    out = _run_python("<!-- tests/test_readme.py runs this block on the demo's run -->",
                      {"/tmp/genclip_demo": str(demo)})
    assert out.strip().endswith("(3, 112, 112)")


def test_train_then_eval_on_another_target_then_predict(tmp_path):
    commands = _block_after("<!-- tests/test_readme.py runs this block verbatim")
    assert [c.split()[1] for c in commands] == ["synthetic", "synthetic", "train", "eval",
                                                "predict"]
    root = tmp_path / "try"
    _run(commands, {"/tmp/genclip_try": str(root)})
    run = root / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["train_root"] == str(root / "source")  # eval did not rewrite it
    tables = json.loads((run / "eval" / "target" / "metrics.json").read_text())
    assert tables["classes"].keys() == {"checker", "disc", "stripes"}
    with (root / "predictions" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(list((root / "target" / "disc" / "test").rglob("*.png")))
    assert all((root / "predictions" / r["heatmap"]).is_file() for r in rows)

    # Decide good or bad: calibrate on the target's good images, then predict with decisions.
    commands = _block_after("<!-- tests/test_readme.py runs this block after the one above")
    assert [c.split()[1] for c in commands] == ["calibrate", "predict", "predict"]
    _run(commands, {"/tmp/genclip_try": str(root)})
    calibration = json.loads((run / "calibration.json").read_text())
    threshold = threshold_zero = calibration["classes"]["disc"]["image_threshold"]
    with (root / "decisions" / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["class"] == "disc" for r in rows)
    for r in rows:
        assert r["decision"] == ("anomalous" if float(r["image_score"]) >= threshold else "normal")
        assert (root / "decisions" / r["mask"]).is_file()
    [record] = [json.loads(line) for line in
                (root / "one_part" / "scores.jsonl").read_text().splitlines()]
    assert record["image"] == "000.png" and record["decision"] in ("normal", "anomalous")

    # Few-shot: eval k=2 from the target's train split, a calibration of its own, decisions.
    commands = _block_after("<!-- tests/test_readme.py runs this few-shot block")
    assert [c.split()[1] for c in commands] == ["eval", "calibrate", "predict"]
    _run(commands, {"/tmp/genclip_try": str(root)})
    few = run / "eval" / "target_2shot_seed0"
    assert json.loads((few / "metrics_2shot_seed0.json").read_text())["classes"].keys() == {
        "checker", "disc", "stripes"}
    assert (few / "metrics_2shot_seed0.md").read_text().startswith("# target: 2-shot")
    assert (run / "eval" / "target" / "metrics.json").is_file()  # the zero-shot one is kept
    few_calibration = json.loads((root / "calibration_2shot.json").read_text())
    assert few_calibration["provenance"]["images"]["disc"]["normal"] == 2  # 4 good - 2 refs
    threshold = few_calibration["classes"]["disc"]["image_threshold"]
    with (root / "decisions_2shot" / "scores.csv").open() as f:
        few_rows = list(csv.DictReader(f))
    assert {r["image"] for r in few_rows} == {r["image"] for r in rows}
    assert [r["image_score"] for r in few_rows] != [r["image_score"] for r in rows]
    for r in few_rows:
        assert r["decision"] == ("anomalous" if float(r["image_score"]) >= threshold else "normal")

    # Export, then serve: the artifact decides like predict did with the run's calibration.
    commands = _block_after("<!-- tests/test_readme.py runs this export block")
    assert [c.split()[1] for c in commands] == ["export"]
    _run(commands, {"/tmp/genclip_try": str(root)})
    manifest = json.loads((root / "artifact" / "manifest.json").read_text())
    assert manifest["batch_size"] == 4 and "disc" in manifest["classes"]
    assert manifest["calibration"]["classes"]["disc"]["image_threshold"] == threshold_zero
    out = _run_python("<!-- tests/test_readme.py runs this serving example",
                      {"/tmp/genclip_try": str(root)})
    served = dict(line.split(" ", 1) for line in out.strip().splitlines())
    decided = {r["image"]: r for r in rows}
    assert served.keys() == decided.keys()
    for name, line in served.items():
        score, decision = line.split()
        assert float(score) == pytest.approx(float(decided[name]["image_score"]), abs=2e-5)
        assert decision == decided[name]["decision"]

    # The papers' protocol on the same two sets: one table row per target, mean ± std.
    commands = _block_after("<!-- tests/test_readme.py runs this block after the whole-path")
    assert [c.split()[1] for c in commands] == ["benchmark"]
    _run(commands, {"/tmp/genclip_try": str(root)})
    table = (root / "table" / "protocol.md").read_text()
    assert table.startswith("| dataset | seeds | image_auroc | image_ap | pixel_auroc |")
    assert "| target | 111,112 | " in table and " ± " in table
    assert "| target 2-shot | 111,112 | " in table
