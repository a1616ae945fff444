"""Checkpoint loading from every real format, on tiny random checkpoints.

References (tests/data/torch_goldens, written by tests/make_torch_goldens.py, so no torch here):
transformers' PyTorch `CLIPModel` features and its HF safetensors / pytorch_model.bin / Flax
msgpack files, an OpenAI-named state dict written by torch.save (plain, `state_dict` wrapper,
TorchScript, `CLIP_CACHE` name lookup), and the published OpenAI architectures (shape-only state
dicts).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from fixtures import fixture_paths, load_sidecar
from flax import traverse_util
from make_torch_goldens import (
    HF_CONTEXT,
    HF_IMAGE,
    HF_PATCH,
    HF_PROJECTION,
    HF_TEXT,
    HF_VISION,
    HF_VOCAB,
    OPENAI_HEADS,
    OPENAI_SPEC,
    OUT,
    openai_state_shapes,
    reference,
)
from safetensors.numpy import load_file, save_file

from genclip_jax import torch_pickle
from genclip_jax.clip import weights
from genclip_jax.clip.model import CLIP

HF_FILES = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin",
            "msgpack": "flax_model.msgpack"}
HF_VISION_FC1_1 = "vision_model.encoder.layers.1.mlp.fc1.weight"  # = resblocks.1.mlp.c_fc.weight


def parity(got, ref) -> tuple[float, float]:
    """(max abs error, tolerance 1e-4 * max(1, max |ref|))."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref))), 1e-4 * max(1.0, float(np.max(np.abs(ref))))


def flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def assert_same_params(a, b):
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@functools.cache
def encoders(config):
    model = CLIP(config)
    image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image)
                    .global_feature)
    text = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=CLIP.encode_text))
    return image, text


def our_features(config, params, images_nchw, ids):
    image, text = encoders(config)
    return (np.asarray(image(params, np.transpose(images_nchw, (0, 2, 3, 1)))),
            np.asarray(text(params, ids.astype(np.int32))))


# --------------------------------------------------------------------------- HF reference


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The golden tiny transformers CLIPModel, one folder per weight layout, with the features
    PyTorch computed from it."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for layout, name in HF_FILES.items():
        dirs[layout] = root / layout
        dirs[layout].mkdir()
        for file in ("config.json", name):
            shutil.copy(OUT / "hf" / file, dirs[layout])
    ref = reference()
    return dict(sd=load_file(str(OUT / "hf" / "model.safetensors")), dirs=dirs,
                images=ref["hf.images"], ids=ref["hf.ids"], ref_image=ref["hf.ref_image"],
                ref_text=ref["hf.ref_text"])


@pytest.mark.parametrize("layout", ["safetensors", "bin", "msgpack"])
def test_hf_features_match_transformers(hf, layout):
    """Standard CLIP (no DPAM, ln_post on CLS) = get_image_features / get_text_features."""
    config, params = weights.load(str(hf["dirs"][layout]), dpam_start=0, global_mode="clip")
    vision, text = HF_VISION, HF_TEXT
    assert (config.vision_layers, config.vision_width, config.vision_heads) == (
        vision["num_hidden_layers"], vision["hidden_size"], vision["num_attention_heads"])
    assert (config.text_layers, config.text_width, config.text_heads) == (
        text["num_hidden_layers"], text["hidden_size"], text["num_attention_heads"])
    assert (config.image_resolution, config.vision_patch_size, config.embed_dim) == (
        HF_IMAGE, HF_PATCH, HF_PROJECTION)
    assert (config.context_length, config.vocab_size) == (HF_CONTEXT, HF_VOCAB)
    image, text = our_features(config, params, hf["images"], hf["ids"])
    for name, got, ref in (("image", image, hf["ref_image"]), ("text", text, hf["ref_text"])):
        err, tol = parity(got, ref)
        assert err <= tol, f"{layout} {name} features: max abs error {err:.3g} > {tol:.3g}"


def test_hf_layouts_give_identical_params(hf):
    loaded = [weights.load(str(hf["dirs"][k]))[1] for k in ("safetensors", "bin", "msgpack")]
    assert_same_params(loaded[0], loaded[1])
    assert_same_params(loaded[0], loaded[2])


def test_flax_msgpack_reader_inverts_the_hf_flax_layout(hf):
    got = weights._hf_from_flax_msgpack(hf["dirs"]["msgpack"] / "flax_model.msgpack")
    want = {k: v for k, v in hf["sd"].items() if not k.endswith("position_ids")}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_pytorch_model_bin_holds_the_safetensors_tensors(hf):
    """The torch.save'd `.bin` (which transformers reads back unchanged: checked when it was
    written) gives, without torch, exactly the tensors of the safetensors file."""
    got = torch_pickle.load(hf["dirs"]["bin"] / "pytorch_model.bin")
    assert sorted(got) == sorted(hf["sd"])
    for k, v in hf["sd"].items():
        assert got[k].dtype == v.dtype == np.float32, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_single_hf_files_load(hf):
    """A bare weight file (no directory) works too, heads from the config.json beside it."""
    want = weights.load(str(hf["dirs"]["safetensors"]))[1]
    for layout, name in HF_FILES.items():
        config, params = weights.load(str(hf["dirs"][layout] / name))
        assert (config.vision_heads, config.text_heads) == (2, 2)  # config.json, not width // 64
        assert_same_params(params, want)


def test_sharded_safetensors_load(hf, tmp_path):
    keys = sorted(hf["sd"])
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for name, names in shards.items():
        save_file({k: hf["sd"][k] for k in names}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(hf["dirs"]["safetensors"] / "config.json", tmp_path)
    assert_same_params(weights.load(str(tmp_path))[1],
                       weights.load(str(hf["dirs"]["safetensors"]))[1])


def test_parity_detects_a_perturbed_weight(hf, tmp_path):
    """The parity above is not vacuous: one changed entry of resblocks.1's c_fc breaks it."""
    sd = dict(hf["sd"])
    sd[HF_VISION_FC1_1] = sd[HF_VISION_FC1_1].copy()
    sd[HF_VISION_FC1_1][5, 7] += 3.0  # init std 0.02; clean parity error is ~1e-6
    save_file(sd, str(tmp_path / "model.safetensors"))
    shutil.copy(hf["dirs"]["safetensors"] / "config.json", tmp_path)
    config, params = weights.load(str(tmp_path), global_mode="clip")
    _, clean = weights.load(str(hf["dirs"]["safetensors"]), global_mode="clip")
    diff = np.argwhere(flat(params)["visual/resblocks_1/mlp/c_fc/kernel"]
                       != flat(clean)["visual/resblocks_1/mlp/c_fc/kernel"])
    assert diff.tolist() == [[7, 5]]  # (in, out): the transpose of torch's (out, in) entry
    image, text = our_features(config, params, hf["images"], hf["ids"])
    err, tol = parity(image, hf["ref_image"])
    assert err > tol, f"perturbed weight went unnoticed: error {err:.3g} <= tolerance {tol:.3g}"
    err, tol = parity(text, hf["ref_text"])
    assert err <= tol  # the text tower is untouched


def test_hf_config_with_unsupported_activation_is_refused(hf, tmp_path):
    shutil.copy(hf["dirs"]["safetensors"] / "model.safetensors", tmp_path)
    cfg = json.loads((hf["dirs"]["safetensors"] / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"vision_config\.hidden_act.*quick_gelu.*gelu"):
        weights.load(str(tmp_path))


def test_hf_missing_and_unexpected_tensors_are_listed(hf):
    sd = dict(hf["sd"])
    del sd["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    del sd["text_model.final_layer_norm.bias"]
    sd["vision_model.encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as info:
        weights.openai_from_hf(sd)
    message = str(info.value)
    for name in ("vision_model.encoder.layers.1.self_attn.k_proj.weight",
                 "text_model.final_layer_norm.bias", "vision_model.encoder.layers.0.extra.weight"):
        assert name in message


# --------------------------------------------------------------------------- hub cache


HUB_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from flax import traverse_util
    from genclip_jax.clip import weights
    got = weights.load("tiny-org/tiny-clip")
    want = weights.load(sys.argv[1])
    fg, fw = (traverse_util.flatten_dict(t[1], sep="/") for t in (got, want))
    same = got[0] == want[0] and sorted(fg) == sorted(fw) and all(
        np.array_equal(fg[k], fw[k]) for k in fg)
    start = time.perf_counter()
    try:
        weights.load("openai/clip-vit-large-patch14-336")
        error = None
    except FileNotFoundError as err:
        error = str(err)
    print(json.dumps({"same": bool(same), "seconds": time.perf_counter() - start,
                      "error": error}))
""")


def _run_hub_script(directory, env: dict) -> dict:
    """Runs HUB_SCRIPT in a fresh process (the hub reads its cache paths at import)."""
    run = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(directory)],
        env=env, capture_output=True, text=True, timeout=120,
        cwd=pathlib.Path(__file__).parent,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_hub_ids_offline_from_cache_and_fail_fast(hf, tmp_path):
    """HF_HUB_OFFLINE=1: a cached hub id loads; an uncached one fails in seconds, saying where
    to put the files. Runs in a subprocess so that the hub's cache location is read from env."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-clip"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf["dirs"]["safetensors"] / name, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu",
               HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hub"))
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    result = _run_hub_script(hf["dirs"]["safetensors"], env)
    assert result["same"]
    assert result["error"] is not None, "an uncached hub id loaded offline"
    assert result["seconds"] < 10, result
    for part in ("openai/clip-vit-large-patch14-336", "HF_HUB_OFFLINE", str(tmp_path / "hub"),
                 "models--openai--clip-vit-large-patch14-336", "model.safetensors",
                 "config.json"):
        assert part in result["error"], (part, result["error"])

    # Not marked offline but no hub reachable (a host name that never resolves, RFC 2606):
    # fails at once too, instead of the hub client's ~20 s of retries.
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT="https://hub.genclip-test.invalid")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(proxy, None)
    result = _run_hub_script(hf["dirs"]["safetensors"], env)
    assert result["same"]  # the cache is still used first, without asking the hub
    assert result["error"] is not None and result["seconds"] < 10, result
    assert "hub.genclip-test.invalid cannot be reached" in result["error"], result["error"]


# --------------------------------------------------------------------------- OpenAI checkpoints


@pytest.fixture(scope="module")
def openai_ref():
    """The golden fixture's OpenAI-named weights, loaded through the `.npz` route."""
    path = fixture_paths()[0]
    cfg = load_sidecar(path)["config"]
    kwargs = dict(vision_heads=cfg["vision_heads"], text_heads=cfg["text_heads"], dpam_start=6)
    config, params = weights.load(str(path), npz_prefix="sd.", **kwargs)
    with np.load(path) as data:
        sd = {k[3:]: data[k] for k in data.files if k.startswith("sd.")}
    return dict(config=config, params=params, sd=sd, kwargs=kwargs)


@pytest.fixture(scope="module")
def openai_tiny():
    """The golden OpenAI-named state dict, loaded from its numpy copy (`.npz` route)."""
    config, params = weights.load(str(OUT / "openai_tiny.npz"), **OPENAI_HEADS)
    return dict(config=config, params=params)


def test_openai_npz_config_matches_the_fixture(openai_ref):
    path = fixture_paths()[0]
    cfg = load_sidecar(path)["config"]
    config = openai_ref["config"]
    for field in ("embed_dim", "image_resolution", "vision_layers", "vision_width",
                  "vision_heads", "vision_patch_size", "context_length", "vocab_size",
                  "text_width", "text_heads", "text_layers"):
        assert getattr(config, field) == cfg[field], field
    assert config.dpam_start == 6


def test_openai_torch_save_state_dict(openai_tiny):
    config, params = weights.load(str(OUT / "openai_tiny.pt"), **OPENAI_HEADS)
    assert config == openai_tiny["config"]
    assert (config.vision_layers, config.vision_width, config.image_resolution) == (
        OPENAI_SPEC["v_layers"], OPENAI_SPEC["v_width"], OPENAI_SPEC["res"])
    assert_same_params(params, openai_tiny["params"])


def test_openai_state_dict_wrapper_and_module_prefix(openai_tiny):
    """{"state_dict": {"module." + name: ...}, "epoch": 3}, as DataParallel training saves."""
    config, params = weights.load(str(OUT / "openai_tiny_wrapped.pth"), **OPENAI_HEADS)
    assert config == openai_tiny["config"]
    assert_same_params(params, openai_tiny["params"])


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_openai_torchscript_archive(openai_tiny):
    """The one test that needs torch: TorchScript archives are programs, read by torch.jit."""
    torch = pytest.importorskip("torch", exc_type=ImportError)  # absent or unusable: skip
    path = OUT / "openai_tiny_jit.pt"
    assert "input_resolution" in torch.jit.load(str(path)).state_dict()
    config, params = weights.load(str(path), **OPENAI_HEADS)
    assert config == openai_tiny["config"]
    assert_same_params(params, openai_tiny["params"])


def test_torchscript_without_torch_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    path = OUT / "openai_tiny_jit.pt"
    with pytest.raises(ImportError) as info:
        weights.load(str(path), **OPENAI_HEADS)
    message = str(info.value)
    for part in (str(path), "TorchScript archive", "needs torch (pip install torch)",
                 "torch.save state dicts, safetensors", "openai/clip-vit-large-patch14-336"):
        assert part in message, (part, message)


def test_openai_name_through_clip_cache(openai_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        weights.load("ViT-L/14@336px")
    message = str(info.value)
    assert str(tmp_path / "ViT-L-14-336px.pt") in message and "CLIP_CACHE" in message
    shutil.copy(OUT / "openai_tiny.pt", tmp_path / "ViT-L-14-336px.pt")
    _, params = weights.load("ViT-L/14@336px", **OPENAI_HEADS)
    assert_same_params(params, openai_tiny["params"])


# --------------------------------------------------------------------------- architectures


# name: (OpenAI state-dict spec, known architecture, published parameter count incl. logit_scale)
ARCHITECTURES = {
    "ViT-B/32": ((512, 224, 12, 768, 32, 512, 12),
                 dict(vision_width=768, vision_layers=12, vision_heads=12, vision_patch_size=32,
                      image_resolution=224, embed_dim=512, text_width=512, text_layers=12,
                      text_heads=8), 151_277_313),
    "ViT-B/16": ((512, 224, 12, 768, 16, 512, 12),
                 dict(vision_width=768, vision_layers=12, vision_heads=12, vision_patch_size=16,
                      image_resolution=224, embed_dim=512, text_width=512, text_layers=12,
                      text_heads=8), 149_620_737),
    "ViT-L/14": ((768, 224, 24, 1024, 14, 768, 12),
                 dict(vision_width=1024, vision_layers=24, vision_heads=16, vision_patch_size=14,
                      image_resolution=224, embed_dim=768, text_width=768, text_layers=12,
                      text_heads=12), 427_616_513),
    "ViT-L/14@336px": ((768, 336, 24, 1024, 14, 768, 12),
                       dict(vision_width=1024, vision_layers=24, vision_heads=16,
                            vision_patch_size=14, image_resolution=336, embed_dim=768,
                            text_width=768, text_layers=12, text_heads=12), 427_944_193),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_inferred_from_openai_shapes(name):
    """Shape-only state dicts (broadcast scalars: no memory) of the released checkpoints."""
    spec, known, n_params = ARCHITECTURES[name]
    shapes = openai_state_shapes(*spec)
    assert sum(int(np.prod(s)) for k, s in shapes.items()
               if k not in ("input_resolution", "context_length", "vocab_size")) == n_params
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    config = weights.config_from_openai(sd)
    for field, value in known.items():
        assert getattr(config, field) == value, (name, field)
    assert (config.context_length, config.vocab_size) == (77, 49408)
    params = weights.params_from_openai(sd, config)  # every name and shape, against the model
    assert sum(int(np.prod(np.shape(v))) for v in flat(params).values()) == n_params - 1


# --------------------------------------------------------------------------- errors


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(openai_ref):
    sd = dict(openai_ref["sd"])
    del sd["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    del sd["ln_final.bias"]
    sd["visual.extra.weight"] = np.zeros(3, np.float32)
    sd["visual.ln_post.weight"] = np.zeros(63, np.float32)
    with pytest.raises(ValueError) as info:
        weights.params_from_openai(sd, openai_ref["config"])
    message = str(info.value)
    assert "missing tensors" in message and "unexpected tensors" in message
    for part in ("visual.transformer.resblocks.1.mlp.c_fc.bias", "ln_final.bias",
                 "visual.extra.weight", "visual.ln_post.weight: expected shape (64,), got (63,)"):
        assert part in message, (part, message)


@pytest.mark.parametrize("change", ["missing", "unexpected", "misshaped"])
def test_each_checkpoint_error_through_load(tmp_path, change):
    with np.load(OUT / "openai_tiny.npz") as data:
        sd = {k: data[k] for k in data.files}
    name = "visual.transformer.resblocks.1.mlp.c_fc.weight"
    if change == "missing":
        del sd[name]
    elif change == "unexpected":
        name = "visual.transformer.resblocks.1.mlp.gate.weight"
        sd[name] = np.zeros(2, np.float32)
    else:
        sd[name] = np.ascontiguousarray(sd[name][:, :-1])
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="does not fit the CLIP architecture") as info:
        weights.load(str(tmp_path / "bad.safetensors"), **OPENAI_HEADS)
    assert name in str(info.value)


def test_not_a_clip_state_dict():
    """An AnomalyCLIP prompt checkpoint is no backbone: the missing tensors are named."""
    with pytest.raises(ValueError, match=r"missing tensors.*visual\.conv1\.weight"):
        weights.load(str(OUT / "anomalyclip_epoch_15.pth"))


def test_missing_paths_and_unknown_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        weights.load(str(tmp_path / "nothing_here.pt"))
    (tmp_path / "weights.ckpt").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"weights\.ckpt.*unknown checkpoint type"):
        weights.load(str(tmp_path / "weights.ckpt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_dir.*model\.safetensors"):
        weights.load(str(tmp_path / "empty_dir"))
