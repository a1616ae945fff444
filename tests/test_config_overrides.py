"""Config values from text: list/tuple fields, dotted overrides, the `configs/X.py:arg` check."""

import importlib.util
import pathlib
import re

import pytest

from genclip_jax import config_overrides, defaults, validate

REPO = pathlib.Path(__file__).resolve().parents[1]
LAYERS = "--config.genclip.layers"


@pytest.mark.parametrize(
    "text", ["6,12,18", "(6,12,18)", "[6,12,18]", " ( 6, 12 ,18 ) ", "6,12,18,", "'6','12','18'"]
)
def test_integer_list_in_every_spelling(text):
    assert config_overrides.parse_sequence(text, [6, 12, 18, 24], LAYERS) == [6, 12, 18]


@pytest.mark.parametrize("text", ["", "()", "[]", " "])
def test_empty_text_is_an_empty_sequence_of_the_default_container(text):
    assert config_overrides.parse_sequence(text, [24], LAYERS) == []
    assert config_overrides.parse_sequence(text, ("a",), "--config.f") == ()


def test_container_and_element_types_follow_the_default():
    parse = config_overrides.parse_sequence
    assert parse("(7,)", [24], LAYERS) == [7]
    assert parse("[7]", (24,), LAYERS) == (7,)
    assert parse("(bottle,'metal nut', \"pcb1\")", (), "--config.data.train_classes") == (
        "bottle", "metal nut", "pcb1"
    )
    assert parse("12,24", ["pixel_auroc"], "--config.eval.metrics") == ["12", "24"]
    assert parse("1,2.5,-3e-1", [0.5], "--config.f") == [1.0, 2.5, -0.3]
    assert parse("1,0.5", [1, 0.5], "--config.f") == [1.0, 0.5]  # mixed numbers: floats
    assert parse("True,no,1", [False], "--config.f") == [True, False, True]
    assert type(parse("6", [24], LAYERS)[0]) is int


@pytest.mark.parametrize(
    ("text", "default", "message"),
    [
        ("6,six", [24], f"{LAYERS}: expected integers, got 'six'"),
        ("6,12.5", [24], f"{LAYERS}: expected integers, got '12.5'"),
        ("0.5,x", [0.5], f"{LAYERS}: expected numbers, got 'x'"),
        ("true,maybe", [True], f"{LAYERS}: expected booleans (true/false), got 'maybe'"),
        ("(6,12", [24], f"{LAYERS}: expected a closing ')' after '(', got '(6,12'"),
        ("[6,12)", [24], f"{LAYERS}: expected a closing ']' after '[', got '[6,12)'"),
        ("6,,12", [24], f"{LAYERS}: expected comma-separated values, got an empty one in '6,,12'"),
        ("6", [[1]], f"{LAYERS}: only sequences of ['bool', 'float', 'int', 'str'] can be set "
                     "from the command line, the default [[1]] holds ['list']"),
    ],
)
def test_bad_values_name_the_field(text, default, message):
    with pytest.raises(ValueError) as err:
        config_overrides.parse_sequence(text, default, LAYERS)
    assert str(err.value) == message


def test_check_config_arg():
    config_overrides.check_config_arg("configs/tiny.py", "genclip", ("anomalyclip", "genclip"))
    with pytest.raises(ValueError) as err:
        config_overrides.check_config_arg("configs/tiny.py", "genclp", ("anomalyclip", "genclip"))
    assert str(err.value) == (
        "configs/tiny.py: arg must be one of ['anomalyclip', 'genclip'], got 'genclp' "
        "(did you mean 'genclip'?)"
    )
    with pytest.raises(ValueError) as err:
        config_overrides.check_config_arg("configs/genclip.py", "xyz", ("mvtec", "visa"))
    assert str(err.value) == "configs/genclip.py: arg must be one of ['mvtec', 'visa'], got 'xyz'"


def _get_config(name: str):
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config


@pytest.mark.parametrize(
    ("name", "typo", "message"),
    [
        ("tiny", "genclp", "configs/tiny.py: arg must be one of ['anomalyclip', 'genclip', "
                           "'winclip'], got 'genclp' (did you mean 'genclip'?)"),
        ("anomalyclip", "Visa", "configs/anomalyclip.py: arg must be one of ['visa', 'mvtec'], "
                                "got 'Visa' (did you mean 'visa'?)"),
        ("genclip", "mvtech", "configs/genclip.py: arg must be one of ['mvtec', 'visa'], "
                              "got 'mvtech' (did you mean 'mvtec'?)"),
        ("winclip", "vsia", "configs/winclip.py: arg must be one of ['mvtec', 'visa'], "
                            "got 'vsia' (did you mean 'visa'?)"),
    ],
)
def test_config_files_reject_a_typo(name, typo, message):
    with pytest.raises(ValueError) as err:
        _get_config(name)(typo)
    assert str(err.value) == message


def test_config_files_accept_their_args():
    assert _get_config("tiny")("").method == "anomalyclip"
    assert _get_config("tiny")("genclip").method == "genclip"
    visa = _get_config("anomalyclip")("visa")
    assert (visa.method, visa.data.train_root, visa.data.test_root) == (
        "anomalyclip", "data/visa", "data/mvtec"
    )
    mvtec = _get_config("genclip")("mvtec")
    assert (mvtec.method, mvtec.data.train_root, mvtec.data.test_root) == (
        "genclip", "data/mvtec", "data/visa"
    )
    assert _get_config("genclip")("visa").data.train_root == "data/visa"
    assert _get_config("anomalyclip")("mvtec").data.train_root == "data/mvtec"
    tiny = _get_config("tiny")("winclip")
    assert (tiny.method, tiny.model.clip, tiny.model.activation, tiny.model.image_size) == (
        "winclip", "random", "gelu", 112)
    for dataset in ("mvtec", "visa"):
        wc = _get_config("winclip")(dataset)
        assert (wc.method, wc.model.clip, wc.model.architecture, wc.model.image_size,
                wc.data.test_root, wc.fewshot.k) == (
            "winclip", "ViT-B-16-plus-240", "ViT-B-16-plus-240", 240, f"data/{dataset}", 0)
        validate.validate(wc, "predict")


def test_apply_overrides_parses_values_by_field_type():
    base = defaults.tiny_config("genclip")
    cfg = config_overrides.apply_overrides(base, {
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
        config_overrides.apply_overrides(defaults.tiny_config("genclip"), {field: "1"})


def test_wrong_type_raises_naming_the_field():
    with pytest.raises(ValueError, match=r"'genclip\.fusion_w'"):
        config_overrides.apply_overrides(defaults.tiny_config("genclip"),
                                         {"genclip.fusion_w": "high"})
