"""`genclip-jax convert anomalyclip`: an official-format `epoch_15.pth` -> `eval.params`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from make_torch_goldens import (
    AC_DEEP_LENGTH,
    AC_DEPTH,
    AC_N_CTX,
    AC_PROJECTION,
    AC_WIDTH,
    OUT,
    reference,
)
from train_helpers import subprocess_env, tiny_config, write_dataset

from genclip_jax import convert, evaluate, parallel
from genclip_jax.clip.model import CLIPConfig
from genclip_jax.methods import create_method

# The golden official-format checkpoint (spec §3.2 keys) at the tiny config's text width.
PTH = OUT / "anomalyclip_epoch_15.pth"
N_CTX, DEPTH, DEEP_LENGTH = AC_N_CTX, AC_DEPTH, AC_DEEP_LENGTH


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(the checkpoint's tensors as torch held them, params export dir) via the CLI."""
    tmp = tmp_path_factory.mktemp("convert")
    assert tiny_config(tmp).model.random_arch.text_width == AC_WIDTH
    out = tmp / "params"
    subprocess.run(
        [sys.executable, "-m", "genclip_jax.cli", "convert", "anomalyclip", f"--pth={PTH}",
         f"--out={out}"],
        check=True, env=subprocess_env(), capture_output=True,
    )
    state = {k.split(".", 1)[1]: v for k, v in reference().items()
             if k.startswith("anomalyclip.")}
    return state, out


def _official_config(data_root, params_dir):
    config = tiny_config(data_root)
    config.prompts.n_ctx, config.prompts.deep_depth = N_CTX, DEPTH
    config.prompts.deep_length = DEEP_LENGTH
    config.eval.params = str(params_dir)
    config.eval.heatmaps_per_class = 1
    return config


def test_eval_runs_on_the_converted_params(converted, tmp_path, monkeypatch):
    state, params_dir = converted
    config = _official_config(write_dataset(tmp_path / "data"), params_dir)
    models = []
    load_model = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda *a: models.append(load_model(*a)) or
                        models[-1])
    rows = evaluate.evaluate(config, str(tmp_path / "run"))
    out = tmp_path / "run" / "eval" / "data"
    assert list(rows) == ["disc"] and (out / "metrics.json").is_file()
    assert json.loads((out / "eval.json").read_text())["model"] == str(params_dir)
    params = jax.device_get(models[0].params)
    np.testing.assert_array_equal(params["ctx_pos"], state["ctx_pos"][0, 0])
    np.testing.assert_array_equal(params["ctx_neg"], state["ctx_neg"][0, 0])
    deep = np.stack([state[f"compound_prompts_text.{i}"] for i in range(DEPTH - 1)])
    np.testing.assert_array_equal(params["deep_prompts"], deep)


def test_prompt_shapes_that_do_not_fit_the_config_name_the_fields_to_set(converted, tmp_path):
    _, params_dir = converted
    config = tiny_config(tmp_path)  # n_ctx 4, deep_depth 3, deep_length 2
    config.eval.params = str(params_dir)
    method = create_method(config, CLIPConfig(**config.model.random_arch.to_dict()))
    with pytest.raises(ValueError) as info:
        evaluate.load_trained_params(config, "", method, parallel.make_mesh())
    assert str(info.value).splitlines() == [
        f"the prompts in {params_dir} do not fit this config; their shapes imply:",
        f"  prompts.n_ctx={N_CTX} (config: 4)",
        f"  prompts.deep_depth={DEPTH} (config: 3)",
        f"  prompts.deep_length={DEEP_LENGTH} (config: 2)",
        f"Set --config.prompts.n_ctx={N_CTX} --config.prompts.deep_depth={DEPTH} "
        f"--config.prompts.deep_length={DEEP_LENGTH} (or use the run's config).",
    ]
    assert re.search(r"ctx_pos: checkpoint \(12, 32\) vs template \(4, 32\).*deep_prompts: "
                     r"checkpoint \(8, 4, 32\) vs template \(2, 2, 32\)",
                     str(info.value.__cause__))


def test_a_pth_without_prompt_learner_is_refused(tmp_path):
    other = OUT / "openai_tiny_wrapped.pth"  # {"state_dict": ..., "epoch": 3}
    with pytest.raises(ValueError, match=r"openai_tiny_wrapped\.pth: expected a dict with the "
                       r"key 'prompt_learner', got \['epoch', 'state_dict'\]"):
        convert.convert("anomalyclip", str(other), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_converter_reads_every_official_key_without_torch():
    """All spec §3.2 keys come back with their shapes and dtypes, the unused projections too."""
    state = convert.read_torch_state_dict(str(PTH), "prompt_learner")
    expected = {"ctx_pos": (1, 1, N_CTX, AC_WIDTH), "ctx_neg": (1, 1, N_CTX, AC_WIDTH)}
    for i in range(DEPTH - 1):
        expected[f"compound_prompts_text.{i}"] = (DEEP_LENGTH, AC_WIDTH)
        expected[f"compound_prompt_projections.{i}.weight"] = (AC_PROJECTION, AC_WIDTH)
        expected[f"compound_prompt_projections.{i}.bias"] = (AC_PROJECTION,)
    for side in ("pos", "neg"):
        expected[f"token_prefix_{side}"] = (1, 1, 1, AC_WIDTH)
        expected[f"token_suffix_{side}"] = (1, 1, 77 - 1 - N_CTX, AC_WIDTH)
        expected[f"tokenized_prompts_{side}"] = (1, 77)
    assert {k: v.shape for k, v in state.items()} == expected
    assert all(v.dtype == np.float32 for v in state.values())
