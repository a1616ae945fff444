"""open_clip checkpoints (WinCLIP's ViT-B-16-plus-240 structure): exact GELU, head counts from
open_clip_config.json, a checkpoint of another architecture refused with its mismatched tensors.

The state dict is the WinCLIP fixture's small open_clip model (`sd.*`, open_clip names), written
here in the formats the HF hub publishes."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest
from fixtures import fixture_paths, load_sidecar
from flax import traverse_util
from safetensors.numpy import save_file

from genclip_jax import defaults
from genclip_jax.backbone import load_backbone
from genclip_jax.clip import weights
from genclip_jax.clip.model import ARCHITECTURES

FIXTURE = fixture_paths("GENCLIP_WINCLIP_FIXTURES", "winclip_*.npz")[0]
HEADS = dict(vision_heads=4, text_heads=4)  # the fixture's head width 16 (64 // 16) and 4


def _state_dict() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return {k[3:]: data[k] for k in data.files if k.startswith("sd.")}


def _model_cfg(**changes) -> dict:
    small = load_sidecar(FIXTURE)["config"]["small_model"]
    cfg = json.loads(json.dumps(small))
    cfg.update(changes)
    return cfg


def _write(folder, sd, model_cfg=None, name="open_clip_model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(folder / name))
    if model_cfg is not None:
        (folder / weights.OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": model_cfg}))
    return folder / name


@pytest.fixture(scope="module")
def reference():
    """The npz route with everything explicit: what every open_clip route must give."""
    return weights.load(str(FIXTURE), npz_prefix="sd.", activation="gelu", **HEADS)


def _same(a, b):
    fa, fb = traverse_util.flatten_dict(a, sep="."), traverse_util.flatten_dict(b, sep=".")
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_folder_with_open_clip_config_states_heads_and_gelu(tmp_path, reference):
    _write(tmp_path / "hub", _state_dict(), _model_cfg())
    config, params = weights.load(str(tmp_path / "hub"))
    assert (config.vision_heads, config.text_heads, config.activation) == (4, 4, "gelu")
    assert config == reference[0]
    _same(params, reference[1])
    # The weight file itself finds its config beside it.
    assert weights.load(str(tmp_path / "hub" / "open_clip_model.safetensors"))[0] == config


def test_quick_gelu_flag_and_explicit_override(tmp_path):
    _write(tmp_path / "q", _state_dict(), _model_cfg(quick_gelu=True))
    assert weights.load(str(tmp_path / "q"))[0].activation == "quick_gelu"
    assert weights.load(str(tmp_path / "q"), activation="gelu")[0].activation == "gelu"


def test_lone_open_clip_file_is_exact_gelu(tmp_path, reference):
    path = _write(tmp_path, _state_dict(), None)
    config, params = weights.load(str(path), **HEADS)
    assert config == reference[0]
    _same(params, reference[1])
    # The same tensors under another file name are an OpenAI-style checkpoint: QuickGELU.
    assert weights.load(str(FIXTURE), npz_prefix="sd.", **HEADS)[0].activation == "quick_gelu"


def test_checkpoint_of_another_architecture_lists_mismatched_tensors(tmp_path):
    sd = _state_dict()
    # Its config promises 3 vision layers of width 64; the tensors have 2.
    fewer = {k: v for k, v in sd.items() if not k.startswith("visual.transformer.resblocks.2.")}
    _write(tmp_path / "two", fewer, _model_cfg())
    with pytest.raises(ValueError, match=r"mismatched tensors.*missing "
                                         r"visual\.transformer\.resblocks\.2\.attn\.in_proj_bias"):
        weights.load(str(tmp_path / "two"))
    # Named as WinCLIP's backbone, the small model fails on every shape, each one listed.
    with pytest.raises(ValueError) as err:
        weights.load(str(FIXTURE), npz_prefix="sd.", architecture="ViT-B-16-plus-240")
    text = str(err.value)
    assert "not a ViT-B-16-plus-240" in text
    assert "ln_final.weight: ViT-B-16-plus-240 has (640,), the checkpoint (32,)" in text
    n_wrong = len(weights.openai_shapes(weights.config_from_openai(_state_dict())))
    n_missing = len(weights.openai_shapes(ARCHITECTURES["ViT-B-16-plus-240"])) - n_wrong
    assert f"mismatched tensors ({n_wrong + n_missing})" in text  # every one counted


def test_named_architecture_supplies_heads_and_activation():
    arch = ARCHITECTURES["ViT-B-16-plus-240"]
    assert (arch.image_resolution, arch.vision_patch_size, arch.vision_width, arch.vision_heads,
            arch.embed_dim, arch.text_width, arch.text_heads, arch.activation) == (
        240, 16, 896, 14, 640, 640, 10, "gelu")
    # A random backbone of that name: the full-size structure (checked before any init).
    cfg = defaults.base_config().model
    cfg.clip, cfg.architecture = "random", "ViT-B-16-plus-240"
    seen = []

    class StopError(Exception):
        pass

    def check(config):
        seen.append(config)
        raise StopError

    with pytest.raises(StopError):
        load_backbone(ml_collections.ConfigDict(cfg), check=check)
    assert seen[0].replace(dpam_start=0, global_mode="cls_no_ln_post") == arch.replace(
        dpam_start=0)
    cfg.activation = "quick_gelu"
    with pytest.raises(StopError):
        load_backbone(cfg, check=check)
    assert seen[1].activation == "quick_gelu"


def test_bad_activation_and_architecture_names():
    with pytest.raises(ValueError, match=r"activation: expected one of .*'gelu'.*got 'relu'"):
        weights.load(str(FIXTURE), npz_prefix="sd.", activation="relu")
    with pytest.raises(ValueError, match=r"architecture: expected .*ViT-B-16-plus-240.*got 'B'"):
        weights.load(str(FIXTURE), npz_prefix="sd.", architecture="B")


def test_the_open_clip_name_offline_says_which_files_to_put_where(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        weights.load("ViT-B-16-plus-240")
    text = str(err.value)
    assert "hf download timm/vit_base_patch16_plus_240.laion400m_e31 open_clip_config.json " \
           "open_clip_model.safetensors" in text
    assert "HF_HUB_OFFLINE is set" in text
