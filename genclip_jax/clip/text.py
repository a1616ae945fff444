"""CLIP's text tower, with the entry points prompt learning needs.

Besides encoding token ids, it encodes prompt *embeddings* directly (learned context vectors
spliced between frozen token embeddings) and can overwrite token rows at chosen layers with
given embeddings: AnomalyCLIP's deep text prompts (spec section 3.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genclip_jax.clip.transformer import LayerNorm, ResidualBlock

Dtype = Any


class TextTransformer(nn.Module):
    """Causal transformer over token embeddings, pooled at the EOT token, then projected.

    Attributes:
      width, layers, heads: architecture; `heads` is explicit (not width // 64).
      context_length, vocab_size, output_dim: as in the checkpoint.
      dtype: compute dtype of the matmuls.
      activation: MLP activation ("quick_gelu" or "gelu").
    """

    width: int
    layers: int
    heads: int
    context_length: int
    vocab_size: int
    output_dim: int
    dtype: Dtype = jnp.float32
    activation: str = "quick_gelu"

    def setup(self):
        self.token_embedding = nn.Embed(self.vocab_size, self.width, name="token_embedding")
        self.positional_embedding = self.param(
            "positional_embedding", nn.initializers.normal(0.01), (self.context_length, self.width)
        )
        self.resblocks = [
            ResidualBlock(self.width, self.heads, dtype=self.dtype, activation=self.activation)
            for _ in range(self.layers)
        ]
        self.ln_final = LayerNorm()
        self.text_projection = self.param(
            "text_projection", nn.initializers.normal(self.width**-0.5),
            (self.width, self.output_dim),
        )

    def _check_ids(self, token_ids: jax.Array) -> None:
        if token_ids.ndim != 2 or token_ids.shape[1] != self.context_length:
            raise ValueError(
                f"token_ids: expected shape (N, {self.context_length}), "
                f"got {tuple(token_ids.shape)}"
            )

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """(N, context_length) int ids -> (N, context_length, width) frozen token embeddings."""
        self._check_ids(token_ids)
        return self.token_embedding(token_ids)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """(N, context_length) ids -> (N, output_dim) unnormalised text features.

        The EOT token has the largest id (49407), so it is found by argmax, as in OpenAI CLIP.
        """
        return self.encode_embeddings(
            self.embed_tokens(token_ids), jnp.argmax(token_ids, axis=-1)
        )

    def encode_embeddings(
        self,
        embeddings: jax.Array,
        eot_index: jax.Array,
        injections: Mapping[int, jax.Array] | None = None,
        inject_start: int = 1,
    ) -> jax.Array:
        """Encodes prompt embeddings.

        Args:
          embeddings: (N, context_length, width) token embeddings (positional ones added here).
          eot_index: (N,) position pooled for each sequence.
          injections: {layer: rows}, 1-indexed layers; before block `layer` runs, rows
            `inject_start : inject_start + n` of every sequence are overwritten by `rows`, shaped
            (n, width) (shared) or (N, n, width). Positional embeddings are not added to them.
          inject_start: first overwritten position (1: right after SOT).

        Returns:
          (N, output_dim) unnormalised features.
        """
        if embeddings.ndim != 3 or embeddings.shape[1:] != (self.context_length, self.width):
            raise ValueError(
                f"embeddings: expected shape (N, {self.context_length}, {self.width}), "
                f"got {tuple(embeddings.shape)}"
            )
        injections = dict(injections or {})
        bad = [layer for layer in injections if not 1 <= layer <= self.layers]
        if bad:
            raise ValueError(f"injections: layers must be in [1, {self.layers}], got {bad}")
        n_seq = embeddings.shape[0]
        x = (embeddings + self.positional_embedding).astype(self.dtype)
        for layer, block in enumerate(self.resblocks, start=1):
            if layer in injections:
                rows = injections[layer]
                rows = jnp.broadcast_to(rows, (n_seq, *rows.shape[-2:])).astype(x.dtype)
                x = x.at[:, inject_start : inject_start + rows.shape[1]].set(rows)
            x, _ = block(x, is_causal=True)
        x = self.ln_final(x)
        pooled = x[jnp.arange(n_seq), eot_index]
        return (pooled @ self.text_projection.astype(pooled.dtype)).astype(jnp.float32)
