"""Checkpoint loading from every real format, on tiny random checkpoints written here.

References: transformers' PyTorch `CLIPModel` (HF safetensors / pytorch_model.bin / Flax msgpack
layouts), the golden fixture's OpenAI-named weights (torch.save, TorchScript, state_dict wrapper,
`CLIP_CACHE` name lookup) and the published OpenAI architectures (shape-only state dicts).
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

from genclip_jax.clip import weights
from genclip_jax.clip.model import CLIP

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT, IMAGE, PATCH = 100, 16, 56, 14
EOS, BOS = VOCAB - 1, VOCAB - 2  # EOT = the largest id, so OpenAI's argmax pooling finds it
HF_VISION_FC1_3 = "vision_model.encoder.layers.3.mlp.fc1.weight"  # = resblocks.3.mlp.c_fc.weight


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


def projected(out, dim: int) -> np.ndarray:
    """get_*_features' result: a tensor (transformers 4) or an output object whose
    `pooler_output` holds the projected features (transformers 5)."""
    if not isinstance(out, torch.Tensor):
        out = out.pooler_output
    out = out.detach().numpy()
    assert out.shape[-1] == dim, f"expected projected features of size {dim}, got {out.shape}"
    return out


# --------------------------------------------------------------------------- HF reference


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random transformers CLIPModel saved in three layouts, plus reference features."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=CONTEXT, eos_token_id=EOS,
            bos_token_id=BOS, pad_token_id=0, hidden_act="quick_gelu",
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu",
        ),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32)
    ids = np.zeros((3, CONTEXT), np.int64)
    for row, eot in enumerate((5, 1, CONTEXT - 1)):  # EOT early, right after SOT, and last
        ids[row, 0], ids[row, eot] = BOS, EOS
        ids[row, 1:eot] = rng.integers(1, BOS, eot - 1)
    # HF pools at the first eos_token_id (or argmax for legacy configs), ours at the argmax.
    assert (ids == EOS).argmax(-1).tolist() == ids.argmax(-1).tolist()

    with torch.no_grad():
        ref_image = projected(model.get_image_features(pixel_values=torch.from_numpy(images)), 16)
        ref_text = projected(model.get_text_features(input_ids=torch.from_numpy(ids)), 16)
        both = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(images))
    # get_*_features are the projected, unnormalised embeddings of the full forward.
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(unit(ref_image), both.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(unit(ref_text), both.text_embeds.numpy(), atol=1e-5)

    root = tmp_path_factory.mktemp("hf")
    dirs = {name: root / name for name in ("safetensors", "bin", "msgpack")}
    model.save_pretrained(dirs["safetensors"])  # transformers 5 writes only safetensors
    assert (dirs["safetensors"] / "model.safetensors").is_file()
    for name in ("bin", "msgpack"):
        dirs[name].mkdir()
        shutil.copy(dirs["safetensors"] / "config.json", dirs[name])
    torch.save(sd, dirs["bin"] / "pytorch_model.bin")  # the legacy HF layout: a torch.save'd dict
    write_hf_flax_msgpack(model, dirs["msgpack"] / "flax_model.msgpack")
    return dict(model=model, sd=sd, dirs=dirs, images=images, ids=ids,
                ref_image=ref_image, ref_text=ref_text, root=root)


def write_hf_flax_msgpack(model, path: pathlib.Path) -> None:
    """Writes the layout FlaxCLIPModel used: nested dicts, Dense kernel (in, out), Conv kernel
    HWIO, LayerNorm scale, Embed embedding; bare parameters (class_embedding, logit_scale) as is."""
    from flax.serialization import msgpack_serialize

    tree: dict = {}

    def put(name: str, value: torch.Tensor) -> None:
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value.detach().numpy().copy()

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            put(f"{name}.kernel", module.weight.T)
        elif isinstance(module, torch.nn.Conv2d):
            put(f"{name}.kernel", module.weight.permute(2, 3, 1, 0))
        elif isinstance(module, torch.nn.LayerNorm):
            put(f"{name}.scale", module.weight)
        elif isinstance(module, torch.nn.Embedding):
            put(f"{name}.embedding", module.weight)
        else:
            continue
        if getattr(module, "bias", None) is not None:
            put(f"{name}.bias", module.bias)
    put("vision_model.embeddings.class_embedding", model.vision_model.embeddings.class_embedding)
    put("logit_scale", model.logit_scale)
    path.write_bytes(msgpack_serialize(tree))


@pytest.mark.parametrize("layout", ["safetensors", "bin", "msgpack"])
def test_hf_features_match_transformers(hf, layout):
    """Standard CLIP (no DPAM, ln_post on CLS) = get_image_features / get_text_features."""
    config, params = weights.load(str(hf["dirs"][layout]), dpam_start=0, global_mode="clip")
    assert (config.vision_layers, config.vision_width, config.vision_heads) == (4, 64, 4)
    assert (config.text_layers, config.text_width, config.text_heads) == (2, 32, 4)
    assert (config.image_resolution, config.vision_patch_size, config.embed_dim) == (56, 14, 16)
    assert (config.context_length, config.vocab_size) == (CONTEXT, VOCAB)
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
    want = {k: v.numpy() for k, v in hf["sd"].items() if not k.endswith("position_ids")}
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_pytorch_model_bin_is_what_transformers_reads(hf):
    """Our legacy `.bin` is a genuine HF checkpoint: transformers loads it back unchanged."""
    again = transformers.CLIPModel.from_pretrained(hf["dirs"]["bin"]).state_dict()
    for k, v in hf["sd"].items():
        assert torch.equal(again[k], v), k


def test_single_hf_files_load(hf):
    """A bare weight file (no directory) works too, heads from the config.json beside it."""
    want = weights.load(str(hf["dirs"]["safetensors"]))[1]
    for layout, name in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin"),
                         ("msgpack", "flax_model.msgpack")):
        config, params = weights.load(str(hf["dirs"][layout] / name))
        assert (config.vision_heads, config.text_heads) == (4, 4)
        assert_same_params(params, want)


def test_sharded_safetensors_load(hf, tmp_path):
    from safetensors.torch import save_file

    keys = sorted(hf["sd"])
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half],
              "model-00002-of-00002.safetensors": keys[half:]}
    for name, names in shards.items():
        save_file({k: hf["sd"][k].contiguous() for k in names}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(hf["dirs"]["safetensors"] / "config.json", tmp_path)
    assert_same_params(weights.load(str(tmp_path))[1],
                       weights.load(str(hf["dirs"]["safetensors"]))[1])


def test_parity_detects_a_perturbed_weight(hf, tmp_path):
    """The parity above is not vacuous: one changed entry of resblocks.3's c_fc breaks it."""
    sd = dict(hf["sd"])
    sd[HF_VISION_FC1_3] = sd[HF_VISION_FC1_3].clone()
    sd[HF_VISION_FC1_3][5, 7] += 3.0  # init std 0.02; clean parity error is ~1e-6
    torch.save(sd, tmp_path / "pytorch_model.bin")
    shutil.copy(hf["dirs"]["bin"] / "config.json", tmp_path)
    config, params = weights.load(str(tmp_path), global_mode="clip")
    _, clean = weights.load(str(hf["dirs"]["bin"]), global_mode="clip")
    diff = np.argwhere(flat(params)["visual/resblocks_3/mlp/c_fc/kernel"]
                       != flat(clean)["visual/resblocks_3/mlp/c_fc/kernel"])
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
    sd = {k: v.numpy() for k, v in hf["sd"].items()}
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


def torch_sd(sd):
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def test_openai_npz_config_matches_the_fixture(openai_ref):
    path = fixture_paths()[0]
    cfg = load_sidecar(path)["config"]
    config = openai_ref["config"]
    for field in ("embed_dim", "image_resolution", "vision_layers", "vision_width",
                  "vision_heads", "vision_patch_size", "context_length", "vocab_size",
                  "text_width", "text_heads", "text_layers"):
        assert getattr(config, field) == cfg[field], field
    assert config.dpam_start == 6


def test_openai_torch_save_state_dict(openai_ref, tmp_path):
    torch.save(torch_sd(openai_ref["sd"]), tmp_path / "ViT-tiny.pt")
    config, params = weights.load(str(tmp_path / "ViT-tiny.pt"), **openai_ref["kwargs"])
    assert config == openai_ref["config"]
    assert_same_params(params, openai_ref["params"])


def test_openai_state_dict_wrapper_and_module_prefix(openai_ref, tmp_path):
    wrapped = {"state_dict": {f"module.{k}": v for k, v in torch_sd(openai_ref["sd"]).items()},
               "epoch": 3}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    config, params = weights.load(str(tmp_path / "ckpt.pth"), **openai_ref["kwargs"])
    assert config == openai_ref["config"]
    assert_same_params(params, openai_ref["params"])


class _OpenAINamed(torch.nn.Module):
    """A module whose state_dict has OpenAI's names, plus the int buffers OpenAI's JIT archives
    carry (input_resolution, context_length, vocab_size)."""

    def __init__(self, sd, resolution: int):
        super().__init__()
        for name, value in sd.items():
            *parents, leaf = name.split(".")
            node = self
            for p in parents:
                if not hasattr(node, p):
                    node.add_module(p, torch.nn.Module())
                node = getattr(node, p)
            node.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
        self.register_buffer("input_resolution", torch.tensor(resolution))
        self.register_buffer("context_length", torch.tensor(sd["positional_embedding"].shape[0]))
        self.register_buffer("vocab_size", torch.tensor(sd["token_embedding.weight"].shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.logit_scale.exp()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_openai_torchscript_archive(openai_ref, tmp_path):
    sd = torch_sd(openai_ref["sd"])
    traced = torch.jit.trace(_OpenAINamed(sd, openai_ref["config"].image_resolution),
                             torch.ones(2))
    torch.jit.save(traced, str(tmp_path / "ViT-tiny-jit.pt"))
    assert "input_resolution" in torch.jit.load(str(tmp_path / "ViT-tiny-jit.pt")).state_dict()
    config, params = weights.load(str(tmp_path / "ViT-tiny-jit.pt"), **openai_ref["kwargs"])
    assert config == openai_ref["config"]
    assert_same_params(params, openai_ref["params"])


def test_openai_name_through_clip_cache(openai_ref, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        weights.load("ViT-L/14@336px")
    message = str(info.value)
    assert str(tmp_path / "ViT-L-14-336px.pt") in message and "CLIP_CACHE" in message
    torch.save(torch_sd(openai_ref["sd"]), tmp_path / "ViT-L-14-336px.pt")
    _, params = weights.load("ViT-L/14@336px", **openai_ref["kwargs"])
    assert_same_params(params, openai_ref["params"])


# --------------------------------------------------------------------------- architectures


def openai_state_shapes(embed, res, v_layers, v_width, patch, t_width, t_layers,
                        context=77, vocab=49408) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of OpenAI's `CLIP` module (clip/model.py), written out independently."""
    shapes = {
        "visual.class_embedding": (v_width,),
        "visual.positional_embedding": ((res // patch) ** 2 + 1, v_width),
        "visual.proj": (v_width, embed),
        "visual.conv1.weight": (v_width, 3, patch, patch),
        "visual.ln_pre.weight": (v_width,), "visual.ln_pre.bias": (v_width,),
        "visual.ln_post.weight": (v_width,), "visual.ln_post.bias": (v_width,),
        "positional_embedding": (context, t_width),
        "text_projection": (t_width, embed),
        "logit_scale": (),
        "token_embedding.weight": (vocab, t_width),
        "ln_final.weight": (t_width,), "ln_final.bias": (t_width,),
        "input_resolution": (), "context_length": (), "vocab_size": (),
    }
    for prefix, width, layers in (("visual.transformer", v_width, v_layers),
                                  ("transformer", t_width, t_layers)):
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}"
            shapes.update({
                f"{b}.attn.in_proj_weight": (3 * width, width),
                f"{b}.attn.in_proj_bias": (3 * width,),
                f"{b}.attn.out_proj.weight": (width, width),
                f"{b}.attn.out_proj.bias": (width,),
                f"{b}.ln_1.weight": (width,), f"{b}.ln_1.bias": (width,),
                f"{b}.mlp.c_fc.weight": (4 * width, width), f"{b}.mlp.c_fc.bias": (4 * width,),
                f"{b}.mlp.c_proj.weight": (width, 4 * width), f"{b}.mlp.c_proj.bias": (width,),
                f"{b}.ln_2.weight": (width,), f"{b}.ln_2.bias": (width,),
            })
    return shapes


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
def test_each_checkpoint_error_through_load(openai_ref, tmp_path, change):
    sd = torch_sd(openai_ref["sd"])
    name = "visual.transformer.resblocks.3.mlp.c_fc.weight"
    if change == "missing":
        del sd[name]
    elif change == "unexpected":
        sd["visual.transformer.resblocks.3.mlp.gate.weight"] = torch.zeros(2)
        name = "visual.transformer.resblocks.3.mlp.gate.weight"
    else:
        sd[name] = sd[name][:, :-1]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit the CLIP architecture") as info:
        weights.load(str(tmp_path / "bad.pt"), **openai_ref["kwargs"])
    assert name in str(info.value)


def test_not_a_clip_state_dict(tmp_path):
    torch.save({"prompt_learner.ctx": torch.zeros(2, 3)}, tmp_path / "epoch_15.pth")
    with pytest.raises(ValueError, match=r"missing tensors.*visual\.conv1\.weight"):
        weights.load(str(tmp_path / "epoch_15.pth"))


def test_missing_paths_and_unknown_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        weights.load(str(tmp_path / "nothing_here.pt"))
    (tmp_path / "weights.ckpt").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"weights\.ckpt.*unknown checkpoint type"):
        weights.load(str(tmp_path / "weights.ckpt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_dir.*model\.safetensors"):
        weights.load(str(tmp_path / "empty_dir"))
