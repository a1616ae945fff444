"""The `genclip-jax` shell: help, usage errors, config overrides and `make-meta`.

Help and flag parsing stop before any JAX work and run in-process; the rest are real processes.
"""

from __future__ import annotations

import json
import logging
import pathlib
import subprocess
import sys

import pytest
from train_helpers import subprocess_env

from genclip_jax import cli
from genclip_jax.data import meta as meta_lib
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
    assert result.stderr.startswith("genclip-jax: expected a command, got 'fit'\n\n")
    assert ("usage: genclip-jax {train,eval,calibrate,predict,export,convert,make-meta,synthetic,"
            "demo,ablate,benchmark}" in result.stderr)
    assert f"  make-meta  {cli.COMMANDS['make-meta'].summary}\n" in result.stderr


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_lists_every_command_with_a_summary_and_an_example(flag):
    result = _cli(flag)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "usage: genclip-jax {train,eval,calibrate,predict,export,convert,make-meta,synthetic,demo,"
        "ablate,benchmark} [flags]"
    )
    for name, command in cli.COMMANDS.items():
        summary = lines.index(f"  {name:<9}  {command.summary}")
        assert lines[summary + 1].startswith(f"             e.g. genclip-jax {name} ")
    assert "             e.g. genclip-jax make-meta --dataset=mvtec --root=/data/mvtec" in lines
    assert "--config.genclip.layers=6,12,18,24" in result.stdout
    assert result.stderr == ""


COMMAND_FLAGS = {
    "train": ["config", "workdir", "profile"],
    "eval": ["config", "workdir", "out", "profile"],
    "calibrate": ["config", "workdir", "normal", "anomalous", "out", "overwrite", "profile"],
    "predict": ["config", "workdir", "images", "calibration", "class", "format", "out", "profile"],
    "export": ["config", "workdir", "out", "batch-size", "platforms", "class", "calibration",
               "overwrite"],
    "convert": ["pth", "out", "overwrite"],
    "make-meta": ["dataset", "root", "out", "overwrite", "test-fraction", "seed"],
    "synthetic": ["out", "seed", "overwrite", "layout"],
    "demo": ["config", "workdir", "profile"],
    "ablate": ["config", "workdir", "sweep", "seeds", "profile"],
    "benchmark": ["config", "workdir", "source", "targets", "roots", "seeds", "shots", "profile"],
}


@pytest.mark.parametrize("command", COMMAND_FLAGS)
def test_command_help_lists_its_own_flags(command, capsys):
    cli.run(["genclip-jax", command, "--help"])  # returns: absl never parses anything
    out = capsys.readouterr().out
    summary = cli.COMMANDS[command].summary
    assert out.startswith(f"usage: genclip-jax {command} [flags]\n\n{summary}\n\nflags:\n")
    flag_lines = out.split("flags:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    listed = [line.split()[0][2:] for line in flag_lines if line.startswith("  --")]
    assert listed == COMMAND_FLAGS[command]
    example = out.split("example:\n  ", 1)[1]
    assert example.startswith(f"genclip-jax {command} ")
    assert ("--config.genclip.layers=6,12,18,24" in out) == ("config" in COMMAND_FLAGS[command])


def test_help_needs_no_other_flag_and_every_spelling_works(capsys):
    result = _cli("train", "--help")  # no --config: still help, exit 0
    assert result.returncode == 0, result.stderr
    assert "  --config   Config file, e.g. configs/anomalyclip.py:visa.\n" in result.stdout
    for argv in (["eval", "-h"], ["eval", "--helpfull"], ["help", "eval"],
                 ["eval", "--workdir=x", "--help"]):
        cli.run(["genclip-jax", *argv])
        out = capsys.readouterr().out
        assert out.startswith("usage: genclip-jax eval [flags]\n"), argv
        assert ("  --out      eval: output folder, default RUN/eval/<name of the test root>; "
                "calibrate: the\n") in out


@pytest.fixture
def parse():
    """Parses `genclip-jax train --config=configs/tiny.py ARGS` in-process; returns the config."""

    def parse_args(*args: str):
        cli.parse_flags(["genclip-jax train", f"--config={REPO / 'configs/tiny.py'}", *args])
        return cli.FLAGS.config

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    yield parse_args
    cli.FLAGS.unparse_flags()
    for name in [n for n in cli.FLAGS if n.startswith("config.")]:  # ml_collections' per override
        delattr(cli.FLAGS, name)
    absl_logger.setLevel(level)  # parsing (and unparsing) --verbosity set it


@pytest.mark.parametrize(
    "args",
    [["--config.genclip.layers=6,12"], ["--config.genclip.layers=(6,12)"],
     ["--config.genclip.layers=[6, 12]"], ["--config.genclip.layers", "(6,12)"],
     ["--config.genclip.layers=1", "-config.genclip.layers=6,12"]],
)
def test_a_list_field_is_overridden_from_the_command_line(parse, args):
    config = parse(*args, "--config.train.lr=3e-4", "--workdir=run")
    assert config.genclip.layers == [6, 12]
    assert config.train.lr == 3e-4  # other overrides still go through ml_collections
    assert config.anomalyclip.features_list == [24]
    assert cli.FLAGS.workdir == "run"


def test_tuple_and_empty_overrides_keep_their_container_type(parse):
    config = parse("--config.data.train_classes=(bottle,'metal nut')", "--config.eval.metrics=",
                   "--config.anomalyclip.features_list=[12,24]", "--config.data.test_classes=a")
    assert config.data.train_classes == ("bottle", "metal nut")
    assert config.data.test_classes == ("a",)
    assert config.eval.metrics == []
    assert config.anomalyclip.features_list == [12, 24]


def test_a_bad_list_element_is_a_flags_error(parse, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--config.genclip.layers=6,six")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "FATAL Flags parsing error: --config.genclip.layers: expected integers, got 'six'\n"
    )


def test_a_config_arg_typo_fails_at_once(tmp_path):
    result = _cli("train", "--config=configs/tiny.py:genclp", f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert result.stderr == (
        "FATAL Flags parsing error: --config=configs/tiny.py:genclp: configs/tiny.py: arg must be "
        "one of ['anomalyclip', 'genclip', 'winclip'], got 'genclp' (did you mean 'genclip'?)\n"
    )
    assert not (tmp_path / "run").exists()


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


def test_make_meta_keeps_a_hand_edited_meta_json_unless_overwrite(tmp_path):
    synthetic.write_synthetic_dataset(tmp_path, image_size=28, classes=("disc",),
                                      defects=("spot",), n_train_good=1, n_test_good=1,
                                      n_test_defect_per_type=1)
    path = tmp_path / "meta.json"
    edited = b'{"train": {}, "test": {}}  \n'  # hand-edited: not what make-meta would write
    path.write_bytes(edited)
    result = _cli("make-meta", "--dataset=mvtec", f"--root={tmp_path}")
    assert result.returncode != 0
    assert f"{path} already exists" in result.stderr
    assert "--overwrite" in result.stderr
    assert path.read_bytes() == edited
    result = _cli("make-meta", "--dataset=mvtec", f"--root={tmp_path}", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}\n"
    assert json.loads(path.read_text()) == meta_lib.generate_meta("mvtec", tmp_path)


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
    result = _cli("make-meta", "--dataset=mvtec", f"--root={data}", "--overwrite", "--profile",
                  f"--workdir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
