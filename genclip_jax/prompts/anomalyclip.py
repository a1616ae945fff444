"""AnomalyCLIP's object-agnostic prompt learner (spec section 3).

Two learnable contexts (normal, abnormal) fill the "X" placeholders of
`[SOT] X..X {normal state} . [EOT]` and `[SOT] X..X {abnormal state} . [EOT]`; deep prompts
overwrite token rows 1..deep_length at text layers 2..deep_depth. Everything else (the class and
state words, the padding) stays the frozen token embedding of the template.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genclip_jax.clip.model import CLIP
from genclip_jax.clip.tokenizer import tokenize

PLACEHOLDER = "X"


def template_ids(cfg: ml_collections.ConfigDict, context_length: int) -> np.ndarray:
    """(2, context_length) ids of the normal and abnormal templates (placeholders included)."""
    ctx = " ".join([PLACEHOLDER] * cfg.n_ctx)
    texts = [
        f"{ctx} {cfg.normal_state.format(cfg.class_word)}.",
        f"{ctx} {cfg.abnormal_state.format(cfg.class_word)}.",
    ]
    return tokenize(texts, context_length=context_length)


def init(rng: jax.Array, cfg: ml_collections.ConfigDict, text_width: int) -> dict:
    """ctx_pos/ctx_neg (n_ctx, C) and deep_prompts (deep_depth - 1, deep_length, C), N(0, std)."""
    k_pos, k_neg, k_deep = jax.random.split(rng, 3)
    std = cfg.init_std
    return {
        "ctx_pos": std * jax.random.normal(k_pos, (cfg.n_ctx, text_width)),
        "ctx_neg": std * jax.random.normal(k_neg, (cfg.n_ctx, text_width)),
        "deep_prompts": std * jax.random.normal(
            k_deep, (max(cfg.deep_depth - 1, 0), cfg.deep_length, text_width)
        ),
    }


def deep_injections(
    deep_prompts: jax.Array, n_seq: int, fp16_round: bool
) -> dict[int, jax.Array]:
    """{text layer: (n_seq, deep_length, C)} for layers 2..deep_depth.

    The reference casts each deep prompt to float16 after broadcasting it to the sequences, so the
    forward sees fp16-rounded values and each sequence's cotangent is rounded to float16 before
    the broadcast sums them: broadcasting first and then `astype` reproduces both.
    """
    injections = {}
    for i, rows in enumerate(deep_prompts):
        rows = jnp.broadcast_to(rows, (n_seq, *rows.shape))
        injections[i + 2] = rows.astype(jnp.float16) if fp16_round else rows
    return injections


def text_features(
    clip: CLIP,
    clip_params: Any,
    params: dict,
    token_ids: jax.Array,
    cfg: ml_collections.ConfigDict,
) -> jax.Array:
    """Unnormalised text features (2, D): row 0 normal, row 1 abnormal.

    Args:
      clip, clip_params: the frozen CLIP module and its parameters.
      params: prompt parameters from `init`.
      token_ids: (2, context_length) from `template_ids`.
    """
    embeddings = jax.lax.stop_gradient(
        clip.apply({"params": clip_params}, token_ids, method=CLIP.embed_tokens)
    )
    ctx = jnp.stack([params["ctx_pos"], params["ctx_neg"]]).astype(embeddings.dtype)
    embeddings = embeddings.at[:, 1 : 1 + cfg.n_ctx].set(ctx)
    injections = deep_injections(params["deep_prompts"], 2, cfg.fp16_deep_prompts)
    return clip.apply(
        {"params": clip_params},
        embeddings,
        jnp.argmax(token_ids, axis=-1),
        injections,
        method=CLIP.encode_text_embeddings,
    )


def from_official(state_dict: dict[str, np.ndarray]) -> dict:
    """Converts an official `epoch_15.pth` prompt_learner state dict to our parameters.

    `ctx_pos`/`ctx_neg` are stored (1, 1, n_ctx, C); `compound_prompts_text.i` (deep_length, C).
    The unused `compound_prompt_projections` and the frozen buffers are dropped.
    """
    for key in ("ctx_pos", "ctx_neg"):
        if key not in state_dict:
            raise ValueError(f"AnomalyCLIP checkpoint: missing {key!r} (got {sorted(state_dict)})")
    deep_keys = sorted(
        (k for k in state_dict if k.startswith("compound_prompts_text.")),
        key=lambda k: int(k.rsplit(".", 1)[1]),
    )
    ctx_pos = np.asarray(state_dict["ctx_pos"], np.float32)
    ctx_neg = np.asarray(state_dict["ctx_neg"], np.float32)
    width = ctx_pos.shape[-1]
    deep = [np.asarray(state_dict[k], np.float32) for k in deep_keys]
    return {
        "ctx_pos": ctx_pos.reshape(-1, width),
        "ctx_neg": ctx_neg.reshape(-1, width),
        "deep_prompts": np.stack(deep) if deep else np.zeros((0, 0, width), np.float32),
    }
