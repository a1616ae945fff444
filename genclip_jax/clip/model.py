"""The whole CLIP (vision + text towers) behind one parameter tree, and its architecture record."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genclip_jax.clip.text import TextTransformer
from genclip_jax.clip.vision import VisionFeatures, VisionTransformer, WindowFeatures

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture of a CLIP checkpoint (what `weights.load` infers) plus run-time switches."""

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_heads: int
    vision_patch_size: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    dpam_start: int = 0
    global_mode: str = "cls_no_ln_post"
    compute_dtype: str = "float32"
    activation: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI) or "gelu" (exact)

    @property
    def grid(self) -> int:
        """Side of the stored positional grid."""
        return self.image_resolution // self.vision_patch_size

    def replace(self, **changes: Any) -> CLIPConfig:
        return dataclasses.replace(self, **changes)


def _openai(embed, res, v_layers, v_width, patch, t_width) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed, image_resolution=res, vision_layers=v_layers, vision_width=v_width,
        vision_heads=v_width // 64, vision_patch_size=patch, context_length=77, vocab_size=49408,
        text_width=t_width, text_heads=t_width // 64, text_layers=12,
    )


# Published architectures: OpenAI's, and open_clip's ViT-B-16-plus-240 (WinCLIP's backbone:
# exact GELU, 64-wide heads). For benchmarks and for checking a checkpoint against its name.
ARCHITECTURES = {
    "ViT-B/32": _openai(512, 224, 12, 768, 32, 512),
    "ViT-B/16": _openai(512, 224, 12, 768, 16, 512),
    "ViT-L/14": _openai(768, 224, 24, 1024, 14, 768),
    "ViT-L/14@336px": _openai(768, 336, 24, 1024, 14, 768),
    "ViT-B-16-plus-240": _openai(640, 240, 12, 896, 16, 640).replace(activation="gelu"),
}


def dtype_of(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"compute_dtype: expected one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class CLIP(nn.Module):
    """Vision tower under `visual`, text tower under `text`."""

    config: CLIPConfig

    def setup(self):
        c = self.config
        dtype = dtype_of(c.compute_dtype)
        self.visual = VisionTransformer(
            width=c.vision_width, layers=c.vision_layers, heads=c.vision_heads,
            patch_size=c.vision_patch_size, grid=c.grid, output_dim=c.embed_dim,
            dpam_start=c.dpam_start, global_mode=c.global_mode, dtype=dtype,
            activation=c.activation,
        )
        self.text = TextTransformer(
            width=c.text_width, layers=c.text_layers, heads=c.text_heads,
            context_length=c.context_length, vocab_size=c.vocab_size, output_dim=c.embed_dim,
            dtype=dtype, activation=c.activation,
        )

    def __call__(self, images: jax.Array, token_ids: jax.Array) -> tuple[VisionFeatures, jax.Array]:
        """Runs both towers (used to create the parameters)."""
        return self.encode_image(images, (self.config.vision_layers,)), self.encode_text(token_ids)

    def encode_image(self, images: jax.Array, patch_layers: Sequence[int] = (),
                     hidden_layers: Sequence[int] = (), hidden_stream: str = "vanilla",
                     ) -> VisionFeatures:
        """The vision tower's features (see `VisionTransformer.__call__` for the arguments)."""
        return self.visual(images, tuple(patch_layers), tuple(hidden_layers), hidden_stream)

    def window_features(
        self, images: jax.Array, windows: Sequence[np.ndarray], patch_ln_post: bool = True
    ) -> WindowFeatures:
        return self.visual.window_features(images, windows, patch_ln_post)

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        return self.text(token_ids)

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        return self.text.embed_tokens(token_ids)

    def encode_text_embeddings(
        self,
        embeddings: jax.Array,
        eot_index: jax.Array,
        injections: Mapping[int, jax.Array] | None = None,
    ) -> jax.Array:
        return self.text.encode_embeddings(embeddings, eot_index, injections)


def image_embeddings(config: CLIPConfig, params: Any, images: jax.Array) -> jax.Array:
    """(B, D) standard CLIP image embeddings `ln_post(CLS) @ proj` of the vanilla stream,
    whatever `config.global_mode` is: comparable with CLIP text embeddings. Frozen."""
    clip = CLIP(config.replace(global_mode="clip"))
    feats = clip.apply({"params": params}, images, method=CLIP.encode_image)
    return jax.lax.stop_gradient(feats.global_feature)


@functools.lru_cache(maxsize=8)
def _jitted_init(config: CLIPConfig):
    """One compiled initialiser per architecture: compiling it costs ~20 s even when tiny."""
    res = config.image_resolution
    images = jnp.zeros((1, res, res, 3), jnp.float32)
    ids = jnp.zeros((1, config.context_length), jnp.int32)
    return jax.jit(lambda key: CLIP(config).init(key, images, ids)["params"])


def init_params(config: CLIPConfig, seed: int = 0) -> dict:
    """Random parameters of the right shapes (tests, benchmarks, shape templates)."""
    return _jitted_init(config)(jax.random.PRNGKey(seed))
