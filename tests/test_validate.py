"""`validate`: every bad value fails at once, names the field, the allowed values and the closest
match, and nothing is written; the backbone-dependent checks name the backbone."""

from __future__ import annotations

import time

import pytest
from train_helpers import tiny_config, write_dataset

from genclip_jax import evaluate, predict, train, train_eval, validate
from genclip_jax.clip.model import CLIPConfig


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def _set(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value


def _fails_fast_with_nothing_written(call, match: str, workdir) -> str:
    start = time.monotonic()
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert time.monotonic() - start < 2.0
    assert not workdir.exists()
    return str(info.value)


@pytest.mark.parametrize("field", sorted(validate.choices()))
def test_every_choice_field_refuses_a_typo_before_any_work(field, data_root, tmp_path):
    config = tiny_config(data_root)
    allowed = validate.choices()[field]
    _set(config, field, allowed[-1] + "x")
    workdir = tmp_path / "run"
    message = _fails_fast_with_nothing_written(
        lambda: train_eval.train_and_evaluate(config, str(workdir)), field, workdir
    )
    assert f"{field}: expected one of {list(allowed)}, got {allowed[-1] + 'x'!r}" in message
    assert f"(did you mean {allowed[-1]!r}?)" in message


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("eval.metrics", ["pixel_auroc", "image_aurco"], "eval.metrics[1]: expected one of"),
    ("eval.metrics", [], "eval.metrics: expected at least one of"),
    ("eval.metrics", ["image_ap", "image_ap"], "expected each name once, got ['image_ap']"),
    ("train.batch_size", 0, "train.batch_size: expected an integer >= 1, got 0"),
    ("train.epochs", -1, "train.epochs: expected an integer >= 1, got -1"),
    ("eval.batch_size", 0, "eval.batch_size: expected an integer >= 1, got 0"),
    ("model.image_size", 0, "model.image_size: expected an integer >= 1, got 0"),
    ("train.lr", float("nan"), "train.lr: expected a finite number > 0, got nan"),
    ("train.b2", 1.0, "train.b2: expected a number in [0, 1), got 1.0"),
    ("genclip.fusion_w", 1.5, "genclip.fusion_w: expected a number in [0, 1], got 1.5"),
    ("anomalyclip.sigma", 0.0, "anomalyclip.sigma: expected a finite number > 0, got 0.0"),
    ("genclip.layers", [6, 6], "genclip.layers: expected each layer once, got [6, 6]"),
    ("anomalyclip.features_list", [0], "anomalyclip.features_list: expected 1-indexed layer"),
    ("prompts.normal_state", "good", "prompts.normal_state: expected a template with one '{}'"),
    ("genclip.cnf.template", "a photo of a {}.",
     "genclip.cnf.template: '{}' takes the word with its article ('an object'); expected no "
     "article before it, got 'a photo of a {}.'"),
    ("data.train_root", "", "data.train_root: set the root of the train dataset"),
])
def test_bad_values_name_the_field_and_what_was_expected(
    field, value, expected, data_root, tmp_path
):
    config = tiny_config(data_root)
    _set(config, field, value)
    workdir = tmp_path / "run"
    _fails_fast_with_nothing_written(
        lambda: train_eval.train_and_evaluate(config, str(workdir)), "invalid config", workdir
    )
    with pytest.raises(ValueError) as info:
        validate.validate(config, "train")
    assert expected in str(info.value)


def test_all_problems_are_listed_at_once(data_root):
    config = tiny_config(data_root)
    config.method = "genclp"
    config.eval.aupro_mode = "exakt"
    with pytest.raises(ValueError) as info:
        validate.validate(config, "eval")
    lines = str(info.value).splitlines()
    assert lines[1] == ("  method: expected one of ['anomalyclip', 'genclip', 'winclip'], got "
                        "'genclp' (did you mean 'genclip'?)")
    assert lines[2] == ("  eval.aupro_mode: expected one of ['reference', 'exact'], got 'exakt' "
                        "(did you mean 'exact'?)")


def test_eval_and_predict_validate_before_loading_anything(data_root, tmp_path):
    config = tiny_config(data_root)
    config.genclip.cnf.rule = "b"
    for call in (lambda: evaluate.evaluate(config, str(tmp_path / "run")),
                 lambda: predict.predict_folder(config, str(tmp_path / "run"), str(data_root))):
        _fails_fast_with_nothing_written(call, r"genclip\.cnf\.rule: .*did you mean 'B'",
                                         tmp_path / "run")


def test_paths_a_command_reads_must_exist(data_root, tmp_path):
    config = tiny_config(data_root)
    config.data.test_root = str(tmp_path / "nowhere")
    config.eval.params = str(tmp_path / "no_export")
    with pytest.raises(ValueError) as info:
        validate.validate(config, "eval")
    message = str(info.value)
    assert f"data.test_root: expected a dataset folder holding meta.json, but {tmp_path}" in message
    assert "eval.params: expected a params export" in message
    validate.validate(tiny_config(data_root), "train")  # the real set passes


def _backbone(layers: int = 24, patch: int = 14) -> CLIPConfig:
    return CLIPConfig(embed_dim=32, image_resolution=56, vision_layers=layers, vision_width=64,
                      vision_heads=4, vision_patch_size=patch, context_length=77,
                      vocab_size=49408, text_width=32, text_heads=4, text_layers=12)


def test_backbone_checks_name_the_field_and_the_backbone(data_root):
    config = tiny_config(data_root)
    config.model.image_size = 100
    with pytest.raises(ValueError) as info:
        validate.check_backbone(config, _backbone())
    assert ("model.image_size: expected a multiple of the patch size 14 of the backbone "
            "model.clip='random', got 100 (nearest: 98 or 112)") in str(info.value)

    config = tiny_config(data_root)
    config.anomalyclip.features_list = [6, 24]
    with pytest.raises(ValueError, match=r"anomalyclip\.features_list: layers \[24\] are beyond "
                       r"the 12 vision layers of the backbone model\.clip='random'"):
        validate.check_backbone(config, _backbone(layers=12))
    config.method = "genclip"
    config.genclip.layers = [3, 13]
    with pytest.raises(ValueError, match=r"genclip\.layers: layers \[13\] are beyond"):
        validate.check_backbone(config, _backbone(layers=12))
    validate.check_backbone(tiny_config(data_root), _backbone())


def test_a_tap_beyond_the_backbone_fails_before_compiling(data_root, tmp_path, monkeypatch):
    from genclip_jax import backbone

    compiled = []
    monkeypatch.setattr(backbone, "init_params", lambda *a: compiled.append(a))
    config = tiny_config(data_root)
    config.model.random_arch.vision_layers = 12
    with pytest.raises(ValueError, match=r"layers \[24\] are beyond the 12 vision layers"):
        train.train(config, str(tmp_path / "run"))
    assert not compiled
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["mean", "", "a/b", "..", " disc", "x\ty"])
def test_reserved_or_unsafe_class_names_are_refused(name):
    with pytest.raises(ValueError, match=r"meta\.json: class"):
        validate.check_class_names(["disc", name], "root/meta.json")
