"""Writes tests/data/torch_goldens/: the torch-made files and PyTorch reference outputs that let
the tests run without torch. Needs torch and transformers, but only to regenerate:

    python tests/make_torch_goldens.py

Everything is tiny and seeded. What each file is (tests/data/README.md has the list):
  hf/                  a random transformers `CLIPModel`: config.json, model.safetensors
                       (save_pretrained), pytorch_model.bin (torch.save of its state dict, the
                       legacy HF layout) and flax_model.msgpack (the FlaxCLIPModel layout)
  openai_tiny.npz      a random OpenAI-named CLIP state dict (numpy: the reference), written by
  openai_tiny.pt       torch.save, as {"state_dict": {"module." + name: ...}, "epoch": 3} in
  openai_tiny_wrapped.pth, and as a TorchScript archive with OpenAI's int buffers in
  openai_tiny_jit.pt
  anomalyclip_epoch_15.pth  an official-format AnomalyCLIP prompt checkpoint (spec §3.2 keys,
                       a real `state_dict()` of a module shaped like the official prompt learner)
  cases.pth            one tensor per dtype, strided / offset / stride-0 / shared-storage views,
                       containers and numbers, for the restricted unpickler
  big_endian.pth       two tensors with byteorder "big" (torch writes the host's order; made by
                       byte-swapping a little-endian file)
  reference.npz        what PyTorch computed or held: `hf.*` features of transformers'
                       CLIPModel, `upsample.*` F.interpolate bilinear, `pipeline.*` PIL + torch
                       ToTensor/Normalize, `cases.*` / `big_endian.*` / `anomalyclip.*` tensors
  manifest.json        the torch / transformers versions that wrote them
"""

from __future__ import annotations

import collections
import functools
import json
import pathlib
import shutil
import sys
import tempfile
import zipfile

import numpy as np
from PIL import Image

OUT = pathlib.Path(__file__).parent / "data" / "torch_goldens"

# The tiny transformers CLIPModel: EOT = the largest id, so OpenAI's argmax pooling finds it.
HF_VOCAB, HF_CONTEXT, HF_IMAGE, HF_PATCH, HF_PROJECTION = 100, 16, 28, 7, 8
HF_EOS, HF_BOS = HF_VOCAB - 1, HF_VOCAB - 2
HF_VISION = dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
HF_TEXT = dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# The OpenAI-named state dict: openai_state_shapes(*OPENAI_SPEC), heads passed when loading.
OPENAI_SPEC = dict(embed=8, res=14, v_layers=2, v_width=16, patch=7, t_width=16, t_layers=2,
                   context=8, vocab=50)
OPENAI_HEADS = dict(vision_heads=2, text_heads=2)
OPENAI_INT_BUFFERS = ("input_resolution", "context_length", "vocab_size")
# The AnomalyCLIP prompt checkpoint: the official n_ctx, depth, deep length and projection size
# at the tiny config's text width.
AC_N_CTX, AC_DEPTH, AC_DEEP_LENGTH, AC_PROJECTION, AC_WIDTH = 12, 9, 4, 896, 32
UPSAMPLE_SIZES = ((16, 11), (37, 37), (4, 3), (7, 5))
PIPELINE_SIZE = 32
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@functools.cache
def reference() -> dict[str, np.ndarray]:
    """The arrays of reference.npz, by key (for the tests)."""
    with np.load(OUT / "reference.npz") as data:
        return {k: data[k] for k in data.files}


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


def hf_inputs() -> tuple[np.ndarray, np.ndarray]:
    """(images (2, 3, S, S) float32, token ids (3, context) int64) for the HF reference."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 3, HF_IMAGE, HF_IMAGE)).astype(np.float32)
    ids = np.zeros((3, HF_CONTEXT), np.int64)
    for row, eot in enumerate((5, 1, HF_CONTEXT - 1)):  # EOT early, right after SOT, and last
        ids[row, 0], ids[row, eot] = HF_BOS, HF_EOS
        ids[row, 1:eot] = rng.integers(1, HF_BOS, eot - 1)
    # HF pools at the first eos_token_id (or argmax for legacy configs), ours at the argmax.
    assert (ids == HF_EOS).argmax(-1).tolist() == ids.argmax(-1).tolist()
    return images, ids


def pipeline_inputs() -> tuple[np.ndarray, np.ndarray]:
    """A non-square RGB image (40, 48, 3) uint8 and its defect mask (40, 48) bool."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    mask = np.zeros((40, 48), bool)
    mask[9:23, 15:38] = True
    mask[30:33, 5:7] = True  # a small blob that the resize nearly erases
    return image, mask


def write_hf(torch, transformers, reference: dict) -> None:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=HF_VOCAB, max_position_embeddings=HF_CONTEXT,
                         eos_token_id=HF_EOS, bos_token_id=HF_BOS, pad_token_id=0,
                         hidden_act="quick_gelu", **HF_TEXT),
        vision_config=dict(image_size=HF_IMAGE, patch_size=HF_PATCH, hidden_act="quick_gelu",
                           **HF_VISION),
        projection_dim=HF_PROJECTION,
    )
    model = transformers.CLIPModel(config).eval()
    images, ids = hf_inputs()
    pixels, tokens = torch.from_numpy(images), torch.from_numpy(ids)
    with torch.no_grad():
        ref_image = _projected(torch, model.get_image_features(pixel_values=pixels))
        ref_text = _projected(torch, model.get_text_features(input_ids=tokens))
        both = model(input_ids=tokens, pixel_values=pixels)
    # get_*_features are the projected, unnormalised embeddings of the full forward.
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    np.testing.assert_allclose(unit(ref_image), both.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(unit(ref_text), both.text_embeds.numpy(), atol=1e-5)
    reference.update({"hf.images": images, "hf.ids": ids, "hf.ref_image": ref_image,
                      "hf.ref_text": ref_text})

    out = OUT / "hf"
    model.save_pretrained(out)  # config.json + model.safetensors (transformers 5: only those)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(sd, out / "pytorch_model.bin")
    _write_hf_flax_msgpack(torch, model, out / "flax_model.msgpack")
    # The .bin is a genuine HF checkpoint: transformers reads it back unchanged.
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("config.json", "pytorch_model.bin"):
            shutil.copy(out / name, tmp)
        again = transformers.CLIPModel.from_pretrained(tmp).state_dict()
    assert all(torch.equal(again[k], v) for k, v in sd.items())


def _projected(torch, out) -> np.ndarray:
    """get_*_features' result: a tensor (transformers 4) or an output object whose
    `pooler_output` holds the projected features (transformers 5)."""
    if not isinstance(out, torch.Tensor):
        out = out.pooler_output
    out = out.detach().numpy()
    assert out.shape[-1] == HF_PROJECTION, out.shape
    return out


def _write_hf_flax_msgpack(torch, model, path: pathlib.Path) -> None:
    """The layout FlaxCLIPModel used: nested dicts, Dense kernel (in, out), Conv kernel HWIO,
    LayerNorm scale, Embed embedding; bare parameters (class_embedding, logit_scale) as is."""
    from flax.serialization import msgpack_serialize

    tree: dict = {}

    def put(name: str, value) -> None:
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


def write_openai(torch) -> None:
    g = torch.Generator().manual_seed(1)
    shapes = openai_state_shapes(**OPENAI_SPEC)
    sd = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()
          if k not in OPENAI_INT_BUFFERS}
    np.savez(OUT / "openai_tiny.npz", **{k: v.numpy() for k, v in sd.items()})
    torch.save(sd, OUT / "openai_tiny.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
               OUT / "openai_tiny_wrapped.pth")
    buffers = {"input_resolution": OPENAI_SPEC["res"], "context_length": OPENAI_SPEC["context"],
               "vocab_size": OPENAI_SPEC["vocab"]}
    traced = torch.jit.trace(_openai_module(torch, sd, buffers), torch.ones(2))
    torch.jit.save(traced, str(OUT / "openai_tiny_jit.pt"))
    assert set(torch.jit.load(str(OUT / "openai_tiny_jit.pt")).state_dict()) == set(shapes)


def _openai_module(torch, sd: dict, buffers: dict):
    """A module whose state_dict has OpenAI's names, plus the int buffers OpenAI's JIT archives
    carry (input_resolution, context_length, vocab_size)."""

    class OpenAINamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in sd.items():
                *parents, leaf = name.split(".")
                node = self
                for p in parents:
                    if not hasattr(node, p):
                        node.add_module(p, torch.nn.Module())
                    node = getattr(node, p)
                node.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
            for name, value in buffers.items():
                self.register_buffer(name, torch.tensor(value))

        def forward(self, x):
            return x * self.logit_scale.exp()

    return OpenAINamed()


def write_anomalyclip(torch, reference: dict) -> None:
    """`torch.save({"prompt_learner": state_dict})` of a module with the official keys.

    The unused projections (the converter drops them) are stride-0 views of one column, so the
    file stays small: torch.save writes a view's storage, not its expanded size.
    """
    g = torch.Generator().manual_seed(2)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02

    class PromptLearner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ctx_pos = torch.nn.Parameter(rand(1, 1, AC_N_CTX, AC_WIDTH))
            self.ctx_neg = torch.nn.Parameter(rand(1, 1, AC_N_CTX, AC_WIDTH))
            self.compound_prompts_text = torch.nn.ParameterList(
                [torch.nn.Parameter(rand(AC_DEEP_LENGTH, AC_WIDTH)) for _ in range(AC_DEPTH - 1)])
            self.compound_prompt_projections = torch.nn.ModuleList()
            for _ in range(AC_DEPTH - 1):
                linear = torch.nn.Linear(AC_WIDTH, AC_PROJECTION)
                linear.weight = torch.nn.Parameter(rand(AC_PROJECTION, 1).expand(-1, AC_WIDTH))
                self.compound_prompt_projections.append(linear)
            for side in ("pos", "neg"):
                self.register_buffer(f"token_prefix_{side}", rand(1, 1, 1, AC_WIDTH))
                self.register_buffer(f"token_suffix_{side}",
                                     rand(1, 1, 77 - 1 - AC_N_CTX, AC_WIDTH))
                self.register_buffer(f"tokenized_prompts_{side}",
                                     torch.zeros(1, 77, dtype=torch.long))

    state = PromptLearner().state_dict()
    torch.save({"prompt_learner": state}, OUT / "anomalyclip_epoch_15.pth")
    for key, value in state.items():
        if key.startswith(("ctx_", "compound_prompts_text.")):
            reference[f"anomalyclip.{key}"] = value.numpy()


def write_cases(torch, reference: dict) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * 0.5
    tensors = collections.OrderedDict(
        float32=torch.randn(2, 3, generator=g),
        float64=torch.randn(3, generator=g, dtype=torch.float64),
        float16=torch.randn(2, 2, generator=g).half(),
        bfloat16=torch.randn(3, 2, generator=g).bfloat16(),
        int64=torch.tensor([-(2**40), 7, 2**62]),
        int32=torch.tensor([[-5, 6], [2**30, 0]], dtype=torch.int32),
        int16=torch.tensor([-300, 301], dtype=torch.int16),
        int8=torch.tensor([-128, 127], dtype=torch.int8),
        uint8=torch.tensor([0, 200, 255], dtype=torch.uint8),
        bool=torch.tensor([True, False, True]),
        complex64=torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64),
        uint16=torch.tensor([1, 60000], dtype=torch.int32).to(torch.uint16),
        float8_e4m3fn=torch.tensor([1.0, -0.5, 448.0]).to(torch.float8_e4m3fn),
        transposed=base.t(),
        sliced=base[1:3, 2:5],
        row=base[2],
        expanded=torch.arange(3.0).reshape(3, 1).expand(3, 4),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        parameter=torch.nn.Parameter(torch.randn(2, generator=g)),
    )
    tensors._metadata = {"": {"version": 1}}  # as a module's state_dict() carries
    obj = {
        "tensors": tensors,
        "shared": [base, base[1]],  # one storage, the second at an offset
        "meta": {"epoch": 3, "lr": 0.5, "name": "tiny", "flags": [True, None], "pair": (1, 2)},
    }
    torch.save(obj, OUT / "cases.pth")
    for name, value in tensors.items():
        value = value.detach()
        if value.dtype in (torch.bfloat16, torch.float8_e4m3fn):
            value = value.float()  # exact: both are subsets of float32
        reference[f"cases.{name}"] = value.numpy()
    reference["cases.base"] = base.numpy()


def write_big_endian(torch, reference: dict) -> None:
    """torch.save writes the host's byte order; a big-endian file is the little one with every
    storage byte-swapped and `byteorder` set to "big"."""
    values = {"float32": torch.tensor([1.5, -2.25, 3e-8]),
              "int16": torch.tensor([[1, -2], [300, -32768]], dtype=torch.int16)}
    with tempfile.TemporaryDirectory() as tmp:
        little = pathlib.Path(tmp) / "little.pth"
        torch.save(values, little)  # storages in order: data/0 float32, data/1 int16
        itemsize = {"data/0": 4, "data/1": 2}
        with zipfile.ZipFile(little) as src, \
                zipfile.ZipFile(OUT / "big_endian.pth", "w", zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                data = src.read(info)
                record = info.filename.split("/", 1)[1]
                if record == "byteorder":
                    data = b"big"
                elif record in itemsize:
                    data = np.frombuffer(data, f"<u{itemsize[record]}").astype(
                        f">u{itemsize[record]}").tobytes()
                dst.writestr(info.filename, data)
    again = torch.load(OUT / "big_endian.pth", weights_only=True)  # torch swaps it back
    for name, value in values.items():
        assert torch.equal(again[name], value), name
        reference[f"big_endian.{name}"] = value.numpy()


def write_upsample(torch, reference: dict) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((2, 7, 5, 3)).astype(np.float32)
    reference["upsample.x"] = x
    for size in UPSAMPLE_SIZES:
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bilinear",
            align_corners=False,
        ).permute(0, 2, 3, 1)
        reference[f"upsample.{size[0]}x{size[1]}"] = want.numpy()


def write_pipeline(torch, reference: dict) -> None:
    """specs §1 written out with PIL and torch's ToTensor/Normalize arithmetic."""
    image, mask = pipeline_inputs()
    size = PIPELINE_SIZE
    resized = Image.fromarray(image).resize((size, size), Image.BICUBIC).convert("RGB")
    t = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div(255)
    t = t.sub(torch.tensor(CLIP_MEAN)[:, None, None]).div(torch.tensor(CLIP_STD)[:, None, None])
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)
    m = torch.from_numpy(np.asarray(m).copy()).float().div(255)
    reference.update({
        "pipeline.image": image, "pipeline.mask": mask,
        "pipeline.ref_image": t.permute(1, 2, 0).numpy(),
        "pipeline.ref_mask": np.where(m.numpy() > 0.5, 1.0, 0.0).astype(np.float32),
    })


def main() -> None:
    import torch
    import transformers

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    reference: dict[str, np.ndarray] = {}
    write_hf(torch, transformers, reference)
    write_openai(torch)
    write_anomalyclip(torch, reference)
    write_cases(torch, reference)
    write_big_endian(torch, reference)
    write_upsample(torch, reference)
    write_pipeline(torch, reference)
    np.savez(OUT / "reference.npz", **reference)
    (OUT / "manifest.json").write_text(json.dumps(
        {"written_by": "tests/make_torch_goldens.py", "torch": torch.__version__,
         "transformers": transformers.__version__, "numpy": np.__version__,
         "python": sys.version.split()[0]}, indent=1) + "\n")
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>9}  {path.relative_to(OUT)}")


if __name__ == "__main__":
    main()
