"""Loads CLIP checkpoints people really have into our one parameter tree.

Every route converges on OpenAI's state-dict names (`visual.conv1.weight`, ...), which
`params_from_openai` maps onto the Flax tree of `genclip_jax.clip.model.CLIP`:

  * Hugging Face: a model id (through the hub cache) or a local directory holding
    `model.safetensors`, `flax_model.msgpack` or `pytorch_model.bin` (sharded `*.index.json`
    too) + `config.json`;
  * OpenAI: `ViT-L-14-336px.pt` (TorchScript archive or plain state dict, optionally wrapped as
    `{"state_dict": ...}`), or a name such as `ViT-L/14@336px` looked up in `$CLIP_CACHE`
    (default `~/.cache/clip`);
  * open_clip: `open_clip_model.safetensors` / `open_clip_pytorch_model.bin` (OpenAI's names)
    with the `open_clip_config.json` beside them (head widths, `quick_gelu`), a folder holding
    them, or an open_clip name such as `ViT-B-16-plus-240` (its HF hub repo, through the cache);
  * a single `.safetensors`, `.msgpack`, `.pt`/`.pth`/`.bin` or `.npz` file of OpenAI- or
    HF-named tensors (`.npz`: optionally under a key prefix).

The architecture is inferred from the tensors; only head counts and the MLP activation need the
checkpoint's config (OpenAI's convention: width // 64 and QuickGELU; open_clip files: exact GELU)
and can be overridden. A checkpoint named as a known architecture (`architecture=`, or an
open_clip config) is checked against it, every mismatched tensor listed. Only TorchScript
archives need torch; `torch.save` files are read by `genclip_jax.torch_pickle`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np

from genclip_jax import torch_pickle, trees
from genclip_jax.clip.model import ARCHITECTURES, CLIPConfig
from genclip_jax.clip.transformer import ACTIVATIONS

OPENAI_NAMES = {
    "ViT-B/32": "ViT-B-32.pt",
    "ViT-B/16": "ViT-B-16.pt",
    "ViT-L/14": "ViT-L-14.pt",
    "ViT-L/14@336px": "ViT-L-14-336px.pt",
}
# Weight files of a HF model folder, in order of preference (none needs torch: torch_pickle).
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "flax_model.msgpack",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# open_clip's files on the HF hub (OpenAI's tensor names) and its model config.
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip names -> their HF hub repo (the pretrained tag WinCLIP uses).
OPEN_CLIP_NAMES = {"ViT-B-16-plus-240": "timm/vit_base_patch16_plus_240.laion400m_e31"}
ACTIVATION_CHOICES = ("auto", *ACTIVATIONS)  # auto: what the checkpoint's config says
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Tensors of OpenAI checkpoints that the model does not use.
_IGNORED = {"input_resolution", "context_length", "vocab_size", "logit_scale"}
_LIST_AT_MOST = 12

StateDict = Mapping[str, np.ndarray]


def openai_cache_dir() -> pathlib.Path:
    """Where OpenAI names (`ViT-L/14@336px`) are looked up: `$CLIP_CACHE` or `~/.cache/clip`."""
    return pathlib.Path(os.environ.get("CLIP_CACHE") or "~/.cache/clip").expanduser()


def _listing(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_LIST_AT_MOST])
    more = len(items) - _LIST_AT_MOST
    return f"[{shown}{f', ... ({more} more)' if more > 0 else ''}]"


# --------------------------------------------------------------------------- architecture


def config_from_openai(
    sd: StateDict, *, vision_heads: int = 0, text_heads: int = 0, **switches
) -> CLIPConfig:
    """Infers the architecture from OpenAI-named tensors (heads default to width // 64).

    Only shapes are read, so shape-only arrays (`np.broadcast_to`) are enough.
    """
    _require(sd, ["visual.conv1.weight", "visual.positional_embedding", "visual.proj",
                  "token_embedding.weight", "positional_embedding", "text_projection",
                  "ln_final.weight"])
    conv = tuple(sd["visual.conv1.weight"].shape)
    if len(conv) != 4 or conv[1] != 3 or conv[2] != conv[3]:
        raise ValueError(
            f"checkpoint: visual.conv1.weight: expected shape (width, 3, patch, patch), got {conv}"
        )
    width, _, patch, _ = conv
    n_pos = sd["visual.positional_embedding"].shape[0]
    grid = round((n_pos - 1) ** 0.5)
    if grid * grid + 1 != n_pos:
        raise ValueError(
            f"checkpoint: visual.positional_embedding: expected 1 + g*g rows (square grid), "
            f"got {n_pos}"
        )
    text_width = sd["ln_final.weight"].shape[0]
    heads = {"vision_heads": vision_heads or max(1, width // 64),
             "text_heads": text_heads or max(1, text_width // 64)}
    for (name, value), w in zip(heads.items(), (width, text_width), strict=True):
        if value <= 0 or w % value:
            raise ValueError(f"{name}: expected a positive divisor of the width {w}, got {value}")
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=grid * patch,
        vision_layers=_count_blocks(sd, "visual.transformer.resblocks."),
        vision_width=width,
        vision_patch_size=patch,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_layers=_count_blocks(sd, "transformer.resblocks."),
        **heads,
        **switches,
    )


def _count_blocks(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in sd if (m := pattern.match(key))}
    if not indices:
        raise ValueError(f"checkpoint: no tensors named '{prefix}N.*'")
    return max(indices) + 1


def _require(sd: StateDict, keys: list[str]) -> None:
    missing = [key for key in keys if key not in sd]
    if missing:
        raise ValueError(
            f"checkpoint: missing tensors {missing}; expected an OpenAI CLIP state dict "
            f"(got {len(sd)} tensors, e.g. {sorted(sd)[:5]})"
        )


def openai_shapes(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an OpenAI CLIP state dict of this architecture holds, with its shape."""
    w, tw, e, p = config.vision_width, config.text_width, config.embed_dim, config.vision_patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (w, 3, p, p),
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (config.grid**2 + 1, w),
        "visual.proj": (w, e),
        "token_embedding.weight": (config.vocab_size, tw),
        "positional_embedding": (config.context_length, tw),
        "text_projection": (tw, e),
    }
    for norm, width in (("visual.ln_pre", w), ("visual.ln_post", w), ("ln_final", tw)):
        shapes[f"{norm}.weight"] = shapes[f"{norm}.bias"] = (width,)
    towers = (("visual.transformer.resblocks.", w, config.vision_layers),
              ("transformer.resblocks.", tw, config.text_layers))
    for prefix, width, layers in towers:
        for i in range(layers):
            b = f"{prefix}{i}."
            shapes |= {
                f"{b}attn.in_proj_weight": (3 * width, width),
                f"{b}attn.in_proj_bias": (3 * width,),
                f"{b}attn.out_proj.weight": (width, width),
                f"{b}attn.out_proj.bias": (width,),
                f"{b}ln_1.weight": (width,), f"{b}ln_1.bias": (width,),
                f"{b}ln_2.weight": (width,), f"{b}ln_2.bias": (width,),
                f"{b}mlp.c_fc.weight": (4 * width, width),
                f"{b}mlp.c_fc.bias": (4 * width,),
                f"{b}mlp.c_proj.weight": (width, 4 * width),
                f"{b}mlp.c_proj.bias": (width,),
            }
    return shapes


# --------------------------------------------------------------------------- OpenAI -> Flax


def _block_params(t: StateDict, prefix: str) -> dict:
    def dense(name: str) -> dict:
        return {"kernel": t[f"{prefix}{name}.weight"].T, "bias": t[f"{prefix}{name}.bias"]}

    def norm(name: str) -> dict:
        return {"scale": t[f"{prefix}{name}.weight"], "bias": t[f"{prefix}{name}.bias"]}

    return {
        "ln_1": norm("ln_1"),
        "attn": {
            "in_proj": {"kernel": t[f"{prefix}attn.in_proj_weight"].T,
                        "bias": t[f"{prefix}attn.in_proj_bias"]},
            "out_proj": dense("attn.out_proj"),
        },
        "ln_2": norm("ln_2"),
        "mlp": {"c_fc": dense("mlp.c_fc"), "c_proj": dense("mlp.c_proj")},
    }


def _openai_tree(sd: StateDict, config: CLIPConfig) -> dict:
    """Builds the Flax tree (float32; views where the input already is float32)."""

    class Float32(dict):
        def __getitem__(self, key):
            return np.asarray(dict.__getitem__(self, key), dtype=np.float32)

    t = Float32(sd)

    def norm(name: str) -> dict:
        return {"scale": t[f"{name}.weight"], "bias": t[f"{name}.bias"]}

    visual = {
        "conv1": {"kernel": t["visual.conv1.weight"].transpose(2, 3, 1, 0)},  # OIHW -> HWIO
        "class_embedding": t["visual.class_embedding"],
        "positional_embedding": t["visual.positional_embedding"],
        "ln_pre": norm("visual.ln_pre"),
        "ln_post": norm("visual.ln_post"),
        "proj": t["visual.proj"],
    }
    for i in range(config.vision_layers):
        visual[f"resblocks_{i}"] = _block_params(t, f"visual.transformer.resblocks.{i}.")
    text = {
        "token_embedding": {"embedding": t["token_embedding.weight"]},
        "positional_embedding": t["positional_embedding"],
        "ln_final": norm("ln_final"),
        "text_projection": t["text_projection"],
    }
    for i in range(config.text_layers):
        text[f"resblocks_{i}"] = _block_params(t, f"transformer.resblocks.{i}.")
    return {"visual": visual, "text": text}


def params_from_openai(sd: StateDict, config: CLIPConfig) -> dict:
    """Maps OpenAI-named tensors onto the Flax tree.

    Missing, unexpected and mis-shaped tensors are all listed in one `ValueError`.
    """
    got = {k: np.shape(v) for k, v in sd.items() if k not in _IGNORED}
    diff = trees.shape_differences(got, openai_shapes(config))
    problems = [f"{what} {_listing(names)}" for what, names in (
        ("missing tensors", diff.missing), ("unexpected tensors", diff.unexpected),
        ("wrong shapes", [f"{k}: expected shape {want}, got {have}"
                          for k, have, want in diff.wrong]),
    ) if names]
    if problems:
        raise ValueError(
            "checkpoint does not fit the CLIP architecture inferred from it "
            f"({_describe(config)}): " + "; ".join(problems)
        )
    return _openai_tree(sd, config)


def _describe(config: CLIPConfig) -> str:
    return (
        f"vision {config.vision_layers}x{config.vision_width} patch {config.vision_patch_size} "
        f"res {config.image_resolution}, text {config.text_layers}x{config.text_width}, "
        f"embed {config.embed_dim}"
    )


# --------------------------------------------------------------------------- Hugging Face

_HF_LAYER = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.")
_HF_LAYER_PARTS = {  # OpenAI block name -> HF layer name (both + ".weight" / ".bias")
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def is_hf_named(sd: StateDict) -> bool:
    """True for transformers `CLIPModel` names (`vision_model.*`, `text_model.*`)."""
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def openai_from_hf(hf: StateDict) -> dict[str, np.ndarray]:
    """Renames a transformers `CLIPModel` state dict (torch layout) to OpenAI's names.

    Missing and unexpected tensors are listed in one `ValueError`.
    """
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    missing: list[str] = []

    def get(name: str) -> np.ndarray | None:
        if name not in hf:
            missing.append(name)
            return None
        used.add(name)
        return hf[name]

    for tower, prefix in (("vision", "visual.transformer"), ("text", "transformer")):
        layer_ids = sorted({int(m.group(2)) for k in hf
                            if (m := _HF_LAYER.match(k)) and m.group(1) == tower})
        for i in layer_ids:
            src, dst = f"{tower}_model.encoder.layers.{i}.", f"{prefix}.resblocks.{i}."
            for part in ("weight", "bias"):
                qkv = [get(f"{src}self_attn.{n}_proj.{part}") for n in "qkv"]
                if all(x is not None for x in qkv):
                    out[f"{dst}attn.in_proj_{part}"] = np.concatenate(qkv, axis=0)
                for ours, theirs in _HF_LAYER_PARTS.items():
                    value = get(f"{src}{theirs}.{part}")
                    if value is not None:
                        out[f"{dst}{ours}.{part}"] = value
    renames = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
    }
    for part in ("weight", "bias"):
        renames[f"vision_model.pre_layrnorm.{part}"] = f"visual.ln_pre.{part}"
        renames[f"vision_model.post_layernorm.{part}"] = f"visual.ln_post.{part}"
        renames[f"text_model.final_layer_norm.{part}"] = f"ln_final.{part}"
    for src, dst in renames.items():
        value = get(src)
        if value is not None:
            out[dst] = value
    # Projections are bias-free Linear layers (out, in); OpenAI stores them as (in, out).
    for src, dst in (("visual_projection.weight", "visual.proj"),
                     ("text_projection.weight", "text_projection")):
        value = get(src)
        if value is not None:
            out[dst] = np.asarray(value).T
    unexpected = sorted(
        k for k in hf if k not in used and k != "logit_scale" and not k.endswith("position_ids")
    )
    problems = []
    if missing:
        problems.append(f"missing tensors {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_listing(unexpected)}")
    if problems:
        raise ValueError(
            "Hugging Face checkpoint: expected the tensors of a transformers CLIPModel; "
            + "; ".join(problems)
        )
    return out


def _hf_from_flax_msgpack(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads a HF `flax_model.msgpack` into torch-layout HF names.

    Flax layout: nested dicts, Dense `kernel` (in, out), Conv `kernel` HWIO, LayerNorm `scale`,
    Embed `embedding`; torch layout: `weight` (out, in), OIHW, `weight`, `weight`.
    """
    from flax import traverse_util
    from flax.serialization import msgpack_restore

    tree = msgpack_restore(pathlib.Path(path).read_bytes())
    if not isinstance(tree, Mapping):
        raise ValueError(f"{path}: expected a msgpack dict of Flax parameters, got {type(tree)}")
    if set(tree) == {"params"}:
        tree = tree["params"]
    flat: dict[str, np.ndarray] = {}
    for name, value in traverse_util.flatten_dict(tree, sep=".").items():
        value = np.asarray(value)
        if name.endswith(".kernel"):
            name = name[: -len(".kernel")] + ".weight"
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        elif name.endswith(".scale"):
            name = name[: -len(".scale")] + ".weight"
        elif name.endswith(".embedding"):
            name = name[: -len(".embedding")] + ".weight"
        flat[name] = value
    return flat


def _torchscript_state_dict(path: pathlib.Path) -> dict:
    """The tensors of a TorchScript archive (OpenAI's JIT release): only torch can read these."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"{path}: a TorchScript archive (like OpenAI's released ViT-L-14-336px.pt); reading "
            "it needs torch (pip install torch). torch.save state dicts, safetensors, "
            "flax_model.msgpack and .npz files do not: e.g. use the Hugging Face weights "
            "'openai/clip-vit-large-patch14-336'"
        ) from err
    model = torch.jit.load(str(path), map_location="cpu")
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _torch_load(path: pathlib.Path) -> dict[str, np.ndarray]:
    """A TorchScript archive's or a `torch.save` file's tensors (unwrapping `state_dict`)."""
    if torch_pickle.is_torchscript(path):
        obj = _torchscript_state_dict(path)
    else:
        obj = torch_pickle.load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict or TorchScript CLIP, got {type(obj)}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _safetensors_load(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    except TypeError:  # bfloat16 has no numpy dtype in safetensors.numpy: go through jax
        from safetensors.flax import load_file

        return {k: np.asarray(v) for k, v in load_file(str(path)).items()}


def _sharded_load(index_path: pathlib.Path) -> dict[str, np.ndarray]:
    """Reads `*.index.json` (HF sharded checkpoint): every shard it names, merged."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{index_path}: expected a HF shard index with a 'weight_map' ({err!r})"
        ) from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path}: names the shard {shard_path}, which is missing")
        tensors.update(read_tensors(shard_path))
    return tensors


def read_tensors(path: str | os.PathLike, npz_prefix: str = "") -> dict[str, np.ndarray]:
    """The tensors of one checkpoint file, in the names it holds (torch layout), as numpy."""
    path = pathlib.Path(path)
    name = path.name
    if name.endswith(".index.json"):
        return _sharded_load(path)
    if path.suffix == ".safetensors":
        return _safetensors_load(path)
    if path.suffix == ".msgpack":
        return _hf_from_flax_msgpack(path)
    if path.suffix in TORCH_SUFFIXES:
        return _torch_load(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            sd = {k[len(npz_prefix):]: data[k] for k in data.files if k.startswith(npz_prefix)}
        if not sd:
            raise ValueError(f"{path}: no arrays with the prefix {npz_prefix!r}")
        return sd
    raise ValueError(
        f"{path}: unknown checkpoint type {path.suffix!r}; expected a HF model directory or id, "
        f"an OpenAI name {list(OPENAI_NAMES)}, or a file ending in .safetensors, .msgpack, "
        f"{', '.join(TORCH_SUFFIXES)}, .index.json or .npz"
    )


def read_hf_directory(directory: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """Reads the first weight file present (in `HF_WEIGHT_FILES` order, then open_clip's) and
    `config.json` (open_clip's: {"open_clip": its config})."""
    directory = pathlib.Path(directory)
    for name in HF_WEIGHT_FILES:
        path = directory / name
        if path.exists():
            return read_tensors(path), _read_hf_config(directory)
    for name in OPEN_CLIP_WEIGHT_FILES:
        path = directory / name
        if path.exists():
            return read_tensors(path), {"open_clip": _read_open_clip_config(path)}
    raise FileNotFoundError(
        f"{directory}: no CLIP weights found; expected one of "
        f"{list(HF_WEIGHT_FILES + OPEN_CLIP_WEIGHT_FILES)} there (with config.json or "
        f"{OPEN_CLIP_CONFIG})"
    )


def _read_open_clip_config(weights_path: pathlib.Path) -> dict:
    """The `model_cfg` of the open_clip_config.json beside a weight file ({} if none)."""
    path = pathlib.Path(weights_path).parent / OPEN_CLIP_CONFIG
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()).get("model_cfg") or {})
    except (json.JSONDecodeError, AttributeError, TypeError) as err:
        raise ValueError(f"{path}: expected JSON with a 'model_cfg' object ({err})") from None


def _open_clip_stated(model_cfg: dict) -> tuple[dict, CLIPConfig | None]:
    """(CLIPConfig fields an open_clip config states, the architecture it describes or None).

    open_clip's defaults apply to what it leaves out: exact GELU unless `quick_gelu`, 64-wide
    vision heads, 8 text heads, context 77, vocabulary 49408. A lone open_clip weight file (no
    config) gets open_clip's exact GELU.
    """
    if not model_cfg:
        return {"activation": "gelu"}, None
    activation = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    try:
        vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        vision_width, text_width = int(vision["width"]), int(text["width"])
        stated = {
            "vision_heads": vision_width // int(vision.get("head_width", 64)),
            "text_heads": int(text.get("heads", 8)),
            "activation": activation,
        }
        arch = CLIPConfig(
            embed_dim=int(model_cfg["embed_dim"]), image_resolution=int(vision["image_size"]),
            vision_layers=int(vision["layers"]), vision_width=vision_width,
            vision_patch_size=int(vision["patch_size"]),
            context_length=int(text.get("context_length", 77)),
            vocab_size=int(text.get("vocab_size", 49408)), text_width=text_width,
            text_layers=int(text["layers"]), **stated,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{OPEN_CLIP_CONFIG}: model_cfg lacks or mistypes {err} (expected "
                         "embed_dim, vision_cfg.{image_size,layers,width,patch_size}, "
                         "text_cfg.{width,layers})") from None
    return stated, arch


def check_architecture(sd: StateDict, expected: CLIPConfig, name: str) -> None:
    """Raises a ValueError listing every tensor of `sd` that a `name` checkpoint would not
    have, lack, or have in another shape."""
    shapes = openai_shapes(expected)
    problems = [f"{k}: {name} has {shapes[k]}, the checkpoint {tuple(np.shape(sd[k]))}"
                for k in sorted(set(shapes) & set(sd)) if tuple(np.shape(sd[k])) != shapes[k]]
    problems += [f"missing {k}" for k in sorted(set(shapes) - set(sd))]
    problems += [f"unexpected {k}" for k in sorted(set(sd) - set(shapes) - _IGNORED)]
    if problems:
        raise ValueError(
            f"checkpoint is not a {name} ({_describe(expected)}); mismatched tensors "
            f"({len(problems)}): {_listing(problems)}"
        )


def _read_hf_config(directory: pathlib.Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _hf_heads(hf_config: dict) -> dict[str, int]:
    """Head counts stated by a HF CLIP `config.json`; refuses what our towers cannot run."""
    heads = {}
    for key, sub in (("vision_heads", "vision_config"), ("text_heads", "text_config")):
        section = hf_config.get(sub) or {}
        act = section.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(
                f"config.json: {sub}.hidden_act: expected 'quick_gelu' (OpenAI CLIP), got {act!r}"
            )
        eps = section.get("layer_norm_eps", 1e-5)
        if abs(float(eps) - 1e-5) > 1e-12:
            raise ValueError(f"config.json: {sub}.layer_norm_eps: expected 1e-05, got {eps!r}")
        value = section.get("num_attention_heads")
        if value:
            heads[key] = int(value)
    return heads


def _hub_error(
    model_id: str, reason: str, config_name: str = "config.json",
    weight_files: tuple[str, ...] = HF_WEIGHT_FILES,
) -> FileNotFoundError:
    from huggingface_hub import constants

    org_name = model_id.replace("/", "--")
    return FileNotFoundError(
        f"{model_id!r} is not a local file or directory, and its Hugging Face weights are not in "
        f"the HF cache {constants.HF_HUB_CACHE} ({reason}). Put them there: on a machine with "
        f"network run `hf download {model_id} {config_name} {weight_files[0]}` and copy the "
        f"folder models--{org_name} into that cache (set HF_HOME or HF_HUB_CACHE to use another "
        f"one), or pass a local directory holding {config_name} and one of {list(weight_files)}."
    )


def _download_hf(
    model_id: str, weight_files: tuple[str, ...] = HF_WEIGHT_FILES,
    config_name: str = "config.json",
) -> pathlib.Path:
    """The snapshot folder of a hub repo holding `config_name` and one of `weight_files`.

    Looks in the HF cache first (no network); then, unless HF_HUB_OFFLINE is set, downloads
    config.json and the first weight file the repo has. Fails at the first network error rather
    than retrying every file, so that a machine without network fails fast.
    """
    from huggingface_hub import constants, hf_hub_download

    try:
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    def fetch(name: str, local_only: bool) -> pathlib.Path:
        return pathlib.Path(hf_hub_download(model_id, name, local_files_only=local_only))

    def fail(reason: str) -> FileNotFoundError:
        return _hub_error(model_id, reason, config_name, weight_files)

    def with_shards(path: pathlib.Path, local_only: bool) -> pathlib.Path:
        if path.name.endswith(".index.json"):
            for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                fetch(shard, local_only)
        return path.parent

    for name in weight_files:
        try:
            path = fetch(name, True)
            fetch(config_name, True)
            return with_shards(path, True)
        except Exception:  # not (fully) cached: try the next file, then the hub
            continue
    if constants.HF_HUB_OFFLINE:
        raise fail("HF_HUB_OFFLINE is set, so the hub is not asked")
    unreachable = _unresolvable_endpoint(constants.ENDPOINT)
    if unreachable:
        raise fail(unreachable)
    try:
        fetch(config_name, False)
    except Exception as err:  # unreachable hub, unknown or gated repo
        raise fail(f"the hub said {type(err).__name__}: {err}") from None
    for name in weight_files:
        try:
            return with_shards(fetch(name, False), False)
        except EntryNotFoundError as err:
            if isinstance(err, LocalEntryNotFoundError):
                raise fail(f"download failed: {err}") from None
        except Exception as err:  # anything else: stop, do not retry other files
            raise fail(f"download failed: {type(err).__name__}: {err}") from None
    raise fail(f"the repo has none of {list(weight_files)}")


def _unresolvable_endpoint(endpoint: str) -> str:
    """Why the hub cannot be reached, if its host name does not resolve (else "").

    The hub client retries a failed request with back-off for ~20 s; a DNS failure is known at
    once. Skipped behind a proxy, where local name resolution says nothing.
    """
    import socket
    import urllib.parse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""
    host = urllib.parse.urlparse(endpoint).hostname
    if not host:
        return ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as err:
        return f"the hub {endpoint} cannot be reached: {err}; set HF_HUB_OFFLINE=1 when offline"
    return ""


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None and not source.startswith(".")


# --------------------------------------------------------------------------- entry point


def read_state_dict(source: str, npz_prefix: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """Returns OpenAI-named tensors and what the source's config states: CLIPConfig fields
    (head counts, activation) and, under "architecture", the CLIPConfig an open_clip config
    describes."""
    source = os.fspath(source)
    path = pathlib.Path(source).expanduser()
    if source in OPENAI_NAMES:
        path = openai_cache_dir() / OPENAI_NAMES[source]
        if not path.is_file():
            raise FileNotFoundError(
                f"OpenAI CLIP {source!r}: expected the checkpoint at {path}; download "
                f"{OPENAI_NAMES[source]} from OpenAI's CLIP release and put it there "
                "(or set CLIP_CACHE to the folder holding it), or use a Hugging Face id such as "
                "'openai/clip-vit-large-patch14-336'"
            )
    if source in OPEN_CLIP_NAMES and not path.exists():
        path = _download_hf(OPEN_CLIP_NAMES[source], OPEN_CLIP_WEIGHT_FILES, OPEN_CLIP_CONFIG)
    if path.is_dir():
        tensors, hf_config = read_hf_directory(path)
    elif path.is_file():
        tensors = read_tensors(path, npz_prefix)
        if is_hf_named(tensors):
            hf_config = _read_hf_config(path.parent)
        else:
            model_cfg = _read_open_clip_config(path)
            open_clip = model_cfg or path.name in OPEN_CLIP_WEIGHT_FILES
            hf_config = {"open_clip": model_cfg} if open_clip else {}
    elif _looks_like_hub_id(source):
        tensors, hf_config = read_hf_directory(_download_hf(source))
    else:
        raise FileNotFoundError(f"{source}: no such checkpoint file or directory")
    if is_hf_named(tensors):
        return openai_from_hf(tensors), _hf_heads(hf_config)
    if "open_clip" not in hf_config:
        return tensors, {}
    stated, arch = _open_clip_stated(hf_config["open_clip"])
    return tensors, {**stated, **({"architecture": arch} if arch else {})}


def load(
    source: str,
    *,
    vision_heads: int = 0,
    text_heads: int = 0,
    npz_prefix: str = "",
    activation: str = "auto",
    architecture: str = "",
    **switches,
) -> tuple[CLIPConfig, dict]:
    """Loads any supported CLIP checkpoint: returns (architecture, Flax params).

    Args:
      source: HF model id or directory, OpenAI `.pt` or name (`ViT-L/14@336px`), open_clip
        weights (file, folder, or a name of `OPEN_CLIP_NAMES`), or a single
        `.safetensors`/`.msgpack`/`.pt`/`.pth`/`.bin`/`.npz` file.
      vision_heads, text_heads: head counts (0: from the checkpoint's config, else width // 64).
      npz_prefix: key prefix of the arrays inside a `.npz` (e.g. "sd.").
      activation: "quick_gelu", "gelu", or "auto" (the checkpoint's config; open_clip files
        without one: exact GELU; else QuickGELU, or that of `architecture`).
      architecture: "" or a name of `ARCHITECTURES` the checkpoint must be (every mismatched
        tensor listed otherwise); it also supplies head counts and activation.
      **switches: run-time CLIPConfig fields (dpam_start, global_mode, compute_dtype).

    Raises:
      FileNotFoundError: no such file, or weights neither local nor in the HF cache while offline.
      ValueError: unknown file type, tensors that do not form a CLIP, or a checkpoint that is
        not the named architecture (all problems listed).
    """
    if activation not in ACTIVATION_CHOICES:
        raise ValueError(f"activation: expected one of {ACTIVATION_CHOICES}, got {activation!r}")
    if architecture and architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: expected '' or one of {sorted(ARCHITECTURES)}, got "
                         f"{architecture!r}")
    sd, stated = read_state_dict(source, npz_prefix)
    expected = stated.pop("architecture", None)
    named = ARCHITECTURES.get(architecture)
    if named is not None:
        check_architecture(sd, named, architecture)
        stated = {"vision_heads": named.vision_heads, "text_heads": named.text_heads,
                  "activation": named.activation, **stated}
    elif expected is not None:
        check_architecture(sd, expected, f"model of {pathlib.Path(source).name}'s "
                                          f"{OPEN_CLIP_CONFIG}")
    given = {"vision_heads": vision_heads, "text_heads": text_heads,
             "activation": "" if activation == "auto" else activation}
    stated.update({k: v for k, v in given.items() if v})
    config = config_from_openai(sd, **stated, **switches)
    return config, params_from_openai(sd, config)
