"""GenCLIP's prompts: state tokens N_p / A_p, shared general query prompts (GQP) and the
multi-layer vision prompts (MVP) added to them (genclip spec sections 2.3, 3).

Layout of every sequence (static, so EOT positions are known on the host):

  normal   : [SOT] n_1..n_K  q_1..q_M  {normal_state(cls)} . [EOT]
  abnormal : [SOT] a_1..a_K  q_1..q_M  {abnormal_state(cls)} . [EOT]

Vision-enhanced prompts use q + V_i (V_i = Linear_i(mean of layer-i tokens), one per layer and
image); the query-only branch uses q alone with the generic class word. With `genclip.use_mvp`
False (the GQP-only ablation) there are no MVP parameters and both branches use q alone.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genclip_jax.clip.model import CLIP
from genclip_jax.clip.tokenizer import tokenize
from genclip_jax.prompts.anomalyclip import PLACEHOLDER, deep_injections

MVP_INITS = ("torch_default", "zeros")
MVP_TARGETS = ("all", "first")


def normalize_class_name(name: str) -> str:
    """'metal_nut' -> 'metal nut': the words a prompt uses for a dataset's class folder."""
    return " ".join(name.replace("_", " ").split()).lower()


def prompt_texts(cfg: ml_collections.ConfigDict, class_word: str) -> list[str]:
    """[normal, abnormal] texts with placeholders where the learnable tokens go."""
    slots = " ".join([PLACEHOLDER] * (cfg.state_len + cfg.gqp_len))
    return [f"{slots} {cfg.normal_state.format(class_word)}.",
            f"{slots} {cfg.abnormal_state.format(class_word)}."]


@functools.lru_cache(maxsize=4096)
def _class_ids(texts: tuple[str, str], context_length: int, class_word: str) -> np.ndarray:
    try:
        return tokenize(list(texts), context_length=context_length)
    except ValueError as err:
        raise ValueError(
            f"class name {class_word!r}: the GenCLIP prompt does not fit the text context "
            f"({err}); shorten the class name or the prompt lengths (genclip.state_len, "
            "genclip.gqp_len)"
        ) from None


def class_token_ids(
    cfg: ml_collections.ConfigDict, class_word: str, context_length: int
) -> np.ndarray:
    """(2, context_length) ids of the normal/abnormal prompts of one class word."""
    return _class_ids(tuple(prompt_texts(cfg, class_word)), context_length, class_word)


def uses_mvp(cfg: ml_collections.ConfigDict) -> bool:
    """`genclip.use_mvp`: whether the MVP projections exist at all."""
    return bool(cfg.use_mvp)


def init(
    rng: jax.Array, cfg: ml_collections.ConfigDict, vision_width: int, text_width: int
) -> dict:
    """N_p, A_p (K, Ct), GQP (M, Ct), MVP Linear per layer (L, Cv, Ct) + (L, Ct) unless
    `use_mvp` is False, deep prompts if `deep_depth > 1`."""
    keys = jax.random.split(rng, 6)
    std = cfg.init_std
    n_layers = len(cfg.layers)
    if cfg.mvp_init not in MVP_INITS:
        raise ValueError(f"genclip.mvp_init: expected one of {MVP_INITS}, got {cfg.mvp_init!r}")
    if cfg.mvp_init == "zeros":
        kernel = jnp.zeros((n_layers, vision_width, text_width))
        bias = jnp.zeros((n_layers, text_width))
    else:  # torch nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        bound = 1.0 / math.sqrt(vision_width)
        kernel = jax.random.uniform(keys[3], (n_layers, vision_width, text_width),
                                    minval=-bound, maxval=bound)
        bias = jax.random.uniform(keys[4], (n_layers, text_width), minval=-bound, maxval=bound)
    params = {
        "normal_ctx": std * jax.random.normal(keys[0], (cfg.state_len, text_width)),
        "abnormal_ctx": std * jax.random.normal(keys[1], (cfg.state_len, text_width)),
        "gqp": std * jax.random.normal(keys[2], (cfg.gqp_len, text_width)),
    }
    if uses_mvp(cfg):
        params["mvp_kernel"] = kernel
        params["mvp_bias"] = bias if cfg.mvp_bias else jnp.zeros((n_layers, 0))
    if cfg.deep_depth > 1:
        params["deep_prompts"] = std * jax.random.normal(
            keys[5], (cfg.deep_depth - 1, cfg.deep_length, text_width)
        )
    return params


def vision_prompts(params: dict, hidden_mean: jax.Array) -> jax.Array:
    """MVP tokens V_i^P = Linear_i(mean tokens of layer i): (L, B, Cv) -> (L, B, Ct)."""
    out = jnp.einsum("lbc,lct->lbt", hidden_mean, params["mvp_kernel"],
                     precision=jax.lax.Precision.HIGHEST)
    if params["mvp_bias"].shape[-1]:
        out = out + params["mvp_bias"][:, None]
    return out


def query_tokens(params: dict, mvp: jax.Array | None, target: str) -> jax.Array:
    """GQP (M, Ct) plus the MVP token (..., Ct), broadcast over the M positions or the first."""
    gqp = params["gqp"]
    if mvp is None:
        return gqp
    if target not in MVP_TARGETS:
        raise ValueError(f"genclip.mvp_target: expected one of {MVP_TARGETS}, got {target!r}")
    if target == "first":
        mvp = mvp[..., None, :] * (jnp.arange(gqp.shape[0]) == 0)[:, None]
    else:
        mvp = mvp[..., None, :]
    return gqp + mvp


def text_features(
    clip: CLIP,
    clip_params,
    params: dict,
    token_ids: jax.Array,
    cfg: ml_collections.ConfigDict,
    mvp: jax.Array | None = None,
) -> jax.Array:
    """Unnormalised text features of GenCLIP prompts.

    Args:
      token_ids: (..., 2, context_length) ids from `class_token_ids` ([normal, abnormal]).
      mvp: None (query-only prompts) or (..., Ct) MVP tokens, one per leading index of
        `token_ids` (e.g. (B, L) images x layers with token_ids (B, L, 2, 77)).

    Returns:
      (..., 2, D): one feature per sequence, all sequences encoded in one text-encoder call.
      The CLIP parameters are frozen here (no gradient reaches them).
    """
    clip_params = jax.lax.stop_gradient(clip_params)
    lead = token_ids.shape[:-2]
    ids = token_ids.reshape(-1, token_ids.shape[-1])
    embeddings = jax.lax.stop_gradient(
        clip.apply({"params": clip_params}, ids, method=CLIP.embed_tokens)
    ).reshape(*lead, 2, *ids.shape[1:], -1)
    k, m = cfg.state_len, cfg.gqp_len
    states = jnp.stack([params["normal_ctx"], params["abnormal_ctx"]])  # (2, K, Ct)
    query = query_tokens(params, mvp, cfg.mvp_target)  # (..., M, Ct)
    query = jnp.broadcast_to(query[..., None, :, :], (*lead, 2, m, query.shape[-1]))
    embeddings = embeddings.at[..., 1 : 1 + k, :].set(
        jnp.broadcast_to(states, (*lead, *states.shape)).astype(embeddings.dtype)
    )
    embeddings = embeddings.at[..., 1 + k : 1 + k + m, :].set(query.astype(embeddings.dtype))
    n_seq = ids.shape[0]
    injections = None
    if "deep_prompts" in params:
        injections = deep_injections(params["deep_prompts"], n_seq, cfg.fp16_deep_prompts)
    features = clip.apply(
        {"params": clip_params},
        embeddings.reshape(n_seq, *embeddings.shape[-2:]),
        jnp.argmax(ids, axis=-1),
        injections,
        method=CLIP.encode_text_embeddings,
    )
    return features.reshape(*lead, 2, -1)
