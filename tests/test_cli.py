"""The `genclip-jax` shell: usage errors and `make-meta` (each case is one real process)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from train_helpers import subprocess_env

from genclip_jax.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genclip_jax.cli", *args], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)


def test_an_override_of_an_unknown_field_is_a_flags_error(tmp_path):
    result = _cli("train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
                  "--config.train.epoch=3")
    assert result.returncode == 1
    assert result.stderr == (
        "FATAL Flags parsing error: a --config.* override names a field the config does not have: "
        "'epoch'\nDid you mean \"epochs\" instead of \"epoch\"?\n"
    )
    assert not any(tmp_path.iterdir())  # nothing started


def test_a_missing_workdir_is_a_usage_error():
    result = _cli("train", "--config=configs/tiny.py")
    assert result.returncode != 0
    assert "train: missing --workdir" in result.stderr


def test_an_unknown_command_prints_the_usage():
    result = _cli("fit")
    assert result.returncode == 2
    assert "usage: genclip-jax {train,eval,predict,convert,make-meta,demo,ablate}" in result.stderr


def test_make_meta_writes_meta_json(tmp_path):
    synthetic.write_synthetic_dataset(tmp_path, image_size=28, classes=("disc",),
                                      defects=("spot",), n_train_good=1, n_test_good=1,
                                      n_test_defect_per_type=1)
    (tmp_path / "meta.json").unlink()
    result = _cli("make-meta", "--dataset=mvtec", f"--root={tmp_path}")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert sorted(meta) == ["test", "train"]
    tests = meta["test"]["disc"]
    assert sorted(e["specie_name"] for e in tests) == ["good", "spot"]
    assert [e["anomaly"] for e in tests if e["specie_name"] == "spot"] == [1]


def test_ablate_rejects_a_sweep_naming_an_unknown_field(tmp_path):
    result = _cli("ablate", "--config=configs/tiny.py:genclip", f"--workdir={tmp_path / 'run'}",
                  f"--config.data.train_root={tmp_path}", f"--config.data.test_root={tmp_path}",
                  "--sweep=mvp,genclip.no_such_knob=1")
    assert result.returncode != 0
    assert "unknown config field 'genclip.no_such_knob'" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing trained


def test_profile_writes_a_trace(tmp_path):
    data = tmp_path / "data"
    synthetic.write_synthetic_dataset(data, image_size=28, classes=("disc",), defects=("spot",),
                                      n_train_good=1, n_test_good=1, n_test_defect_per_type=1)
    result = _cli("make-meta", "--dataset=mvtec", f"--root={data}", "--profile",
                  f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
