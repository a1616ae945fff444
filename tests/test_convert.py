"""`genclip-jax convert anomalyclip`: an official-format `epoch_15.pth` -> `eval.params`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from train_helpers import subprocess_env, tiny_config, write_dataset

from genclip_jax import convert, evaluate, parallel
from genclip_jax.clip.model import CLIPConfig
from genclip_jax.methods import create_method

N_CTX, DEPTH, DEEP_LENGTH, PROJECTION = 12, 9, 4, 896  # the official shapes (spec §3.2)


def official_state_dict(width: int) -> dict[str, torch.Tensor]:
    """Every key of an official AnomalyCLIP `prompt_learner` state dict, random values."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02
    state = {"ctx_pos": rand(1, 1, N_CTX, width), "ctx_neg": rand(1, 1, N_CTX, width)}
    for i in range(DEPTH - 1):
        state[f"compound_prompts_text.{i}"] = rand(DEEP_LENGTH, width)
        state[f"compound_prompt_projections.{i}.weight"] = rand(PROJECTION, width)
        state[f"compound_prompt_projections.{i}.bias"] = rand(PROJECTION)
    for side in ("pos", "neg"):
        state[f"token_prefix_{side}"] = rand(1, 1, 1, width)
        state[f"token_suffix_{side}"] = rand(1, 1, 77 - 1 - N_CTX, width)
        state[f"tokenized_prompts_{side}"] = torch.zeros(1, 77, dtype=torch.long)
    return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(state dict, params export dir) via the CLI, at the tiny config's text width."""
    tmp = tmp_path_factory.mktemp("convert")
    width = tiny_config(tmp).model.random_arch.text_width
    state = official_state_dict(width)
    torch.save({"prompt_learner": state}, tmp / "epoch_15.pth")
    out = tmp / "params"
    subprocess.run(
        [sys.executable, "-m", "genclip_jax.cli", "convert", "anomalyclip",
         f"--pth={tmp / 'epoch_15.pth'}", f"--out={out}"],
        check=True, env=subprocess_env(), capture_output=True,
    )
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
    np.testing.assert_array_equal(params["ctx_pos"], state["ctx_pos"].numpy()[0, 0])
    np.testing.assert_array_equal(params["ctx_neg"], state["ctx_neg"].numpy()[0, 0])
    deep = np.stack([state[f"compound_prompts_text.{i}"].numpy() for i in range(DEPTH - 1)])
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
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: expected a dict with the key "
                       r"'prompt_learner', got \['state_dict'\]"):
        convert.convert("anomalyclip", str(tmp_path / "other.pth"), str(tmp_path / "out"))
