"""The residual attention block shared by CLIP's vision and text towers.

Parameter names follow OpenAI's state dict (`ln_1`, `attn.in_proj`, `attn.out_proj`, `ln_2`,
`mlp.c_fc`, `mlp.c_proj`) so that checkpoint conversion is a rename plus transposes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU: open_clip models trained without `quick_gelu` (ViT-B-16-plus-240)."""
    return jax.nn.gelu(x, approximate=False)


# The MLP activation of a checkpoint: not visible in its tensors, so a `CLIPConfig` field.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


def activation_fn(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (as OpenAI's subclass does)."""

    epsilon: float = 1e-5

    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


class MLP(nn.Module):
    """c_proj(act(c_fc(x))) with a 4x hidden width; `activation` names a key of ACTIVATIONS."""

    width: int
    dtype: Dtype = jnp.float32
    activation: str = "quick_gelu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(4 * self.width, dtype=self.dtype, name="c_fc")(x)
        act = activation_fn(self.activation)
        return nn.Dense(self.width, dtype=self.dtype, name="c_proj")(act(h))


# Above this many score bytes per call (B x H x N x N float32), CPU attention runs one head at a
# time: a head's scores stay in cache, all heads' do not. Measured on a 2-core Xeon at ViT-L/518
# (N = 1370, 16 heads, 120 MB): 0.49 s batched, 0.14 s per head through dot_product_attention,
# 0.09 s with the plain (N, d) x (d, N) products below. Text (40 x 12 heads x 77^2, 11 MB) is
# faster batched.
PER_HEAD_MIN_SCORE_BYTES = 1 << 25


def _attention_per_head(q: jax.Array, k: jax.Array, v: jax.Array, is_causal: bool) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v for one (batch, head) pair at a time; logits and softmax in
    float32 as in `jax.nn.dot_product_attention`. q, k, v: (B, N, H, d) -> (B, N, H, d)."""
    b, n, h, d = q.shape

    def one_head_each(x: jax.Array) -> jax.Array:  # (B, N, H, d) -> (B*H, N, d)
        return x.transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], d)

    def head(qkv: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        qh, kh, vh = qkv
        logits = jnp.matmul(qh, kh.T, preferred_element_type=jnp.float32) * d**-0.5
        if is_causal:
            causal = jnp.tril(jnp.ones(logits.shape, bool))
            logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(logits, axis=-1).astype(vh.dtype) @ vh

    out = jax.lax.map(head, (one_head_each(q), one_head_each(k), one_head_each(v)))
    return out.reshape(b, h, n, d).transpose(0, 2, 1, 3)


def multi_head_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False
) -> jax.Array:
    """Scaled dot-product attention over heads.

    Args:
      q, k, v: (B, N, H, d).
      is_causal: mask out keys after each query (text tower).

    Returns:
      (B, N, H, d). Uses `jax.nn.dot_product_attention`, which picks cuDNN's fused kernel on GPU
      when it can and the plain XLA path elsewhere; on CPU, long sequences run it head by head
      (`PER_HEAD_MIN_SCORE_BYTES`).
    """
    b, n, h, _ = q.shape
    if b * h * n * k.shape[1] * 4 < PER_HEAD_MIN_SCORE_BYTES:
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal)
    return jax.lax.platform_dependent(
        q, k, v,
        cpu=lambda q, k, v: _attention_per_head(q, k, v, is_causal),
        default=lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=is_causal),
    )


class Attention(nn.Module):
    """Packed-QKV multi-head attention with an optional V-V (DPAM) path.

    The V-V path of AnomalyCLIP replaces q and k by v (softmax(v v^T / sqrt(d)) v) and shares the
    output projection with the vanilla path.
    """

    width: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, is_causal: bool = False, with_vv: bool = False,
        cls_only: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Returns (vanilla output, V-V output or None); x is (B, N, width). With `cls_only` the
        vanilla output is (B, 1, width): only the first query attends (its row is unchanged)."""
        b, n, _ = x.shape
        head_dim = self.width // self.heads
        qkv = nn.Dense(3 * self.width, dtype=self.dtype, name="in_proj")(x)
        q, k, v = jnp.split(qkv.reshape(b, n, 3 * self.heads, head_dim), 3, axis=2)
        out_proj = nn.Dense(self.width, dtype=self.dtype, name="out_proj")
        vanilla = multi_head_attention(q[:, :1] if cls_only else q, k, v, is_causal=is_causal)
        vanilla = out_proj(vanilla.reshape(b, vanilla.shape[1], -1))
        if not with_vv:
            return vanilla, None
        vv = out_proj(multi_head_attention(v, v, v).reshape(b, n, -1))
        return vanilla, vv


class ResidualBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)); in dual mode also advances the V-V stream."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32
    activation: str = "quick_gelu"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        x_vv: jax.Array | None = None,
        *,
        is_causal: bool = False,
        dual: bool = False,
        cls_only: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Args: x (B, N, C) vanilla stream; x_vv (B, N, C) V-V stream or None.

        In dual mode the V-V stream gets only the V-V attention output (no MLP, no ln_2), and
        starts from the vanilla input when `x_vv` is None (the first DPAM block). Attention input
        is always ln_1 of the vanilla stream (AnomalyCLIP spec section 2.4). `cls_only`: the
        caller needs only the first (CLS) row of the vanilla output, returned as (B, 1, C); the
        V-V stream stays whole. Saves the last block's MLP and vanilla attention over patches.
        """
        attn_out, vv_out = Attention(self.width, self.heads, dtype=self.dtype, name="attn")(
            LayerNorm(name="ln_1")(x), is_causal=is_causal, with_vv=dual, cls_only=cls_only
        )
        if dual:
            x_vv = (x if x_vv is None else x_vv) + vv_out
        x = (x[:, :1] if cls_only else x) + attn_out
        mlp = MLP(self.width, dtype=self.dtype, activation=self.activation, name="mlp")
        x = x + mlp(LayerNorm(name="ln_2")(x))
        return x, x_vv
