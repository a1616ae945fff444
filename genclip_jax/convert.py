"""Official prompt checkpoints -> our params exports, so published numbers reproduce in JAX."""

from __future__ import annotations

import pathlib

import numpy as np

from genclip_jax import checkpoint, torch_pickle
from genclip_jax.prompts import anomalyclip


def read_torch_state_dict(path: str, key: str) -> dict[str, np.ndarray]:
    """`torch.load(path)[key]` as float32 numpy arrays, read without torch (`torch_pickle`)."""
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    obj = torch_pickle.load(path)
    if not isinstance(obj, dict) or key not in obj:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: expected a dict with the key {key!r}, got {found}")
    if not isinstance(obj[key], dict):
        raise ValueError(f"{path}: {key}: expected a state dict, got {type(obj[key]).__name__}")
    return {k: np.asarray(v, np.float32) for k, v in obj[key].items()}


def convert_anomalyclip(pth: str) -> tuple[dict, dict]:
    """(params, description) from an official AnomalyCLIP `epoch_N.pth`."""
    params = anomalyclip.from_official(read_torch_state_dict(pth, "prompt_learner"))
    n_ctx, width = params["ctx_pos"].shape
    deep = params["deep_prompts"]
    info = {
        "method": "anomalyclip", "source": str(pth), "prompts.n_ctx": n_ctx,
        "prompts.deep_depth": deep.shape[0] + 1, "prompts.deep_length": deep.shape[1],
        "text_width": width,
    }
    return params, info


CONVERTERS = {"anomalyclip": convert_anomalyclip}


def convert(method: str, pth: str, out: str, *, overwrite: bool = False) -> pathlib.Path:
    """Writes a params export (`checkpoint.save_params`) usable as `eval.params`."""
    if method not in CONVERTERS:
        raise ValueError(f"convert: method must be one of {sorted(CONVERTERS)}, got {method!r}")
    params, info = CONVERTERS[method](pth)
    checkpoint.save_params(out, params, info, overwrite=overwrite)
    return pathlib.Path(out)
