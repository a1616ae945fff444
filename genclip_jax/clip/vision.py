"""CLIP's vision tower with AnomalyCLIP's DPAM (V-V attention) dual path and layer taps.

Layers are 1-indexed residual blocks, as in AnomalyCLIP's `features_list`. Blocks
`dpam_start..layers` run both the vanilla attention and the V-V attention; the vanilla stream is
exactly standard CLIP, the V-V stream feeds the anomaly maps (AnomalyCLIP spec sections 2.3-2.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from genclip_jax.clip.preprocess import model_input
from genclip_jax.clip.transformer import LayerNorm, ResidualBlock

Dtype = Any

GLOBAL_MODES = ("cls_no_ln_post", "clip")
HIDDEN_STREAMS = ("vanilla", "vv")  # what `hidden_mean` averages


@flax.struct.dataclass
class VisionFeatures:
    """What one vision forward returns.

    global_feature: (B, D) image embedding (see `VisionTransformer.global_mode`).
    patch_tokens: (L, B, N, D) `ln_post(tokens) @ proj` at each requested patch layer, CLS row
      included (N = 1 + h*w); tokens come from the V-V stream at DPAM layers, else the vanilla one.
    hidden_mean: (L', B, C) mean over all tokens (CLS included) of the raw residual stream
      (vanilla by default) at each requested hidden layer: the input of GenCLIP's multi-layer
      vision prompts. Only the mean is kept, so cached features stay small. Empty leading axis
      when none was requested.
    """

    global_feature: jax.Array
    patch_tokens: jax.Array
    hidden_mean: jax.Array


# The axis of the batch in each field (patch tokens and hidden means are layer-major).
BATCH_AXES = VisionFeatures(global_feature=0, patch_tokens=1, hidden_mean=1)


def batch_axes(feats: Any) -> Any:
    """The batch axis of every leaf of a method's features: `BATCH_AXES` for VisionFeatures,
    the leading axis of anything else (`WindowFeatures`)."""
    return BATCH_AXES if isinstance(feats, VisionFeatures) else jax.tree.map(lambda _: 0, feats)


@flax.struct.dataclass
class WindowFeatures:
    """WinCLIP's frozen features (`VisionTransformer.window_features`).

    image: (B, D) standard CLIP image embeddings. patches: (B, h*w, width) last-block patch
    tokens (after ln_post unless asked raw), not projected. windows: (B, W, D) window
    embeddings, every scale's windows concatenated in scale order.
    """

    image: jax.Array
    patches: jax.Array
    windows: jax.Array


def resize_positional_embedding(pos: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Resizes a (1 + g*g, C) CLIP positional table to a (1 + h*w, C) one.

    Bilinear with half-pixel centres (torch `interpolate(..., align_corners=False)`), the CLS row
    kept as it is: 24x24 -> 37x37 for ViT-L/14-336 run at 518.
    """
    n, c = pos.shape
    side = math.isqrt(n - 1)
    if side * side != n - 1:
        raise ValueError(
            f"positional_embedding: expected 1 + g*g rows for a square grid, got {n} rows"
        )
    if (side, side) == tuple(grid):
        return pos
    table = pos[1:].reshape(side, side, c)
    resized = jax.image.resize(table, (*grid, c), method="linear", antialias=False)
    return jnp.concatenate([pos[:1], resized.reshape(-1, c).astype(pos.dtype)], axis=0)


def _check_layers(name: str, layers: Sequence[int], depth: int) -> None:
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise ValueError(f"{name}: layers are 1-indexed blocks in [1, {depth}], got {list(layers)}")


class VisionTransformer(nn.Module):
    """ViT: patch conv, CLS, positional embedding (resized to the input), ln_pre, blocks, ln_post.

    Attributes:
      width, layers, heads, patch_size: architecture.
      grid: side of the stored positional grid (24 for ViT-L/14-336).
      output_dim: size of the joint embedding (`proj` is (width, output_dim)).
      dpam_start: first 1-indexed block with the V-V path; 0 turns DPAM off.
      global_mode: "cls_no_ln_post" = vanilla CLS @ proj without ln_post (AnomalyCLIP);
        "clip" = ln_post(CLS) @ proj (standard CLIP).
      dtype: compute dtype of the matmuls (parameters stay float32).
      activation: MLP activation ("quick_gelu" or "gelu").
    """

    width: int
    layers: int
    heads: int
    patch_size: int
    grid: int
    output_dim: int
    dpam_start: int = 0
    global_mode: str = "cls_no_ln_post"
    dtype: Dtype = jnp.float32
    activation: str = "quick_gelu"

    def setup(self):
        p, w = self.patch_size, self.width
        self.conv1 = nn.Conv(w, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                             dtype=self.dtype)
        self.class_embedding = self.param("class_embedding", nn.initializers.normal(w**-0.5),
                                          (w,))
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(w**-0.5), (self.grid * self.grid + 1, w)
        )
        self.ln_pre = LayerNorm()
        self.resblocks = [
            ResidualBlock(w, self.heads, dtype=self.dtype, activation=self.activation)
            for _ in range(self.layers)
        ]
        self.ln_post = LayerNorm()
        self.proj = self.param("proj", nn.initializers.normal(w**-0.5), (w, self.output_dim))

    def embed(self, images: jax.Array) -> jax.Array:
        """(B, H, W, 3) images -> (B, 1 + h*w, width) tokens: CLS and patches with their
        positional embeddings, before ln_pre. H and W are multiples of `patch_size`. Images are
        uint8 pixels, normalised here (`preprocess.model_input`), or CLIP-normalised floats."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected shape (B, H, W, 3), got {tuple(images.shape)}")
        _, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"images: height and width must be multiples of the patch size {p}, got {h}x{w}"
            )
        x = self.conv1(model_input(images).astype(self.dtype))
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, self.width)
        cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, self.width))
        x = jnp.concatenate([cls, x], 1)
        return x + resize_positional_embedding(self.positional_embedding, (gh, gw)).astype(x.dtype)

    def _project(self, x: jax.Array) -> jax.Array:
        return x @ self.proj.astype(self.dtype)

    def __call__(
        self,
        images: jax.Array,
        patch_layers: Sequence[int] = (),
        hidden_layers: Sequence[int] = (),
        hidden_stream: str = "vanilla",
    ) -> VisionFeatures:
        """Encodes images (B, H, W, 3) (uint8 pixels or normalised floats, see `embed`); H and
        W multiples of `patch_size`.

        `hidden_stream` picks the stream averaged for `hidden_mean`: "vanilla" (standard CLIP) or
        "vv" (the V-V stream at DPAM layers, the vanilla one below them).
        """
        if self.global_mode not in GLOBAL_MODES:
            raise ValueError(
                f"global_mode: expected one of {GLOBAL_MODES}, got {self.global_mode!r}"
            )
        _check_layers("patch_layers", patch_layers, self.layers)
        _check_layers("hidden_layers", hidden_layers, self.layers)
        if hidden_stream not in HIDDEN_STREAMS:
            raise ValueError(f"hidden_stream: expected 'vanilla' or 'vv', got {hidden_stream!r}")
        x = self.ln_pre(self.embed(images))
        b, n_tokens = x.shape[:2]

        taps, hidden = {}, {}
        x_vv = None
        for layer, block in enumerate(self.resblocks, start=1):
            dual = 0 < self.dpam_start <= layer
            vanilla_read = ((layer in patch_layers and not dual)
                            or (layer in hidden_layers and not (dual and hidden_stream == "vv")))
            # After the last block only the vanilla CLS row is read unless a tap reads it whole.
            x, x_vv = block(x, x_vv, dual=dual,
                            cls_only=layer == self.layers and not vanilla_read)
            if layer in patch_layers:
                taps[layer] = x_vv if dual else x
            if layer in hidden_layers:
                hidden[layer] = (x_vv if dual and hidden_stream == "vv" else x).mean(axis=1)

        # ln_post runs on the CLS row in both modes so that the parameter tree never depends on it.
        cls_ln = self.ln_post(x[:, 0])
        global_feature = self._project(cls_ln if self.global_mode == "clip" else x[:, 0])
        if patch_layers:
            patch_tokens = jnp.stack([self._project(self.ln_post(taps[layer]))
                                      for layer in patch_layers])
        else:
            patch_tokens = jnp.zeros((0, b, n_tokens, self.output_dim), x.dtype)
        if hidden_layers:
            hidden_mean = jnp.stack([hidden[layer] for layer in hidden_layers])
        else:
            hidden_mean = jnp.zeros((0, b, self.width), x.dtype)
        # Features leave the tower in float32: similarities, softmax and maps stay fp32 in bf16.
        return jax.tree.map(lambda f: f.astype(jnp.float32),
                            VisionFeatures(global_feature, patch_tokens, hidden_mean))

    def _cls_embedding(self, tokens: jax.Array) -> jax.Array:
        """(N, T, width) tokens before ln_pre -> (N, D) `ln_post(CLS out) @ proj` (vanilla)."""
        x = self.ln_pre(tokens)
        for layer, block in enumerate(self.resblocks, start=1):
            x, _ = block(x, cls_only=layer == self.layers)
        return self._project(self.ln_post(x[:, 0]))

    def window_features(
        self, images: jax.Array, windows: Sequence[np.ndarray], patch_ln_post: bool = True
    ) -> WindowFeatures:
        """WinCLIP's embeddings of the whole image, of its patches and of windows of patches.

        Args:
          images: (B, H, W, 3) uint8 pixels or normalised floats (see `embed`).
          windows: per scale an int array (n_windows, s*s) of 0-based patch indices (row-major
            on the h x w grid). Each window is CLS + its patch tokens (taken after the positional
            embedding) run through ln_pre, every block and ln_post as a sequence of its own; all
            windows of a scale run as one batch of B * n_windows short sequences.
          patch_ln_post: patch tokens after ln_post (open_clip >= 2.23) or raw.

        Returns:
          WindowFeatures: image (B, D) `ln_post(CLS) @ proj`; patches (B, h*w, width) from the
          last block, not projected; windows (B, sum n_windows, D), scales concatenated.
        """
        tokens = self.embed(images)
        x = self.ln_pre(tokens)
        for block in self.resblocks:
            x, _ = block(x)
        image = self._project(self.ln_post(x[:, 0]))
        patches = self.ln_post(x[:, 1:]) if patch_ln_post else x[:, 1:]
        b, _, c = tokens.shape
        per_scale = []
        for idx in windows:
            idx = np.asarray(idx)
            n_win, size = idx.shape
            cls = jnp.broadcast_to(tokens[:, None, :1], (b, n_win, 1, c))
            seq = jnp.concatenate([cls, tokens[:, 1 + idx]], axis=2)
            per_scale.append(self._cls_embedding(seq.reshape(b * n_win, 1 + size, c))
                             .reshape(b, n_win, -1))
        d = self.output_dim
        window = jnp.concatenate(per_scale, axis=1) if per_scale else jnp.zeros((b, 0, d))
        return jax.tree.map(lambda f: f.astype(jnp.float32), WindowFeatures(image, patches, window))
