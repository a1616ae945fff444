"""WinCLIP and WinCLIP+ behind the method interface: a frozen CLIP, a fixed prompt ensemble and
sliding windows; nothing to train (winclip spec).

Zero-shot: the anomalous probability of the image embedding and of every window embedding
against the class's two mean text embeddings; per scale, each patch takes the harmonic mean of
the windows covering it; the map is the harmonic mean of the image score and the scale maps.
WinCLIP+ (`fewshot.k` > 0) adds the distances to k normal references of the class (patch and
window memories), averaged into a few-shot map fused half-and-half with the zero-shot one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import FrozenConfigDict

from genclip_jax import fewshot, maps, steps
from genclip_jax.clip import model as clip_model
from genclip_jax.clip.model import CLIP, CLIPConfig
from genclip_jax.clip.vision import WindowFeatures
from genclip_jax.methods.config_key import ConfigKeyed
from genclip_jax.prompts import winclip as prompts
from genclip_jax.prompts.genclip import normalize_class_name

_HIGHEST = jax.lax.Precision.HIGHEST


def window_indices(grid: int, scale: int) -> np.ndarray:
    """(n_windows, scale * scale) int32 row-major patch indices of every scale x scale window
    at stride 1 on a grid x grid patch grid, windows in row-major order of their corner."""
    if not 1 <= scale <= grid:
        raise ValueError(f"winclip.scales: a window of {scale}x{scale} patches does not fit the "
                         f"{grid}x{grid} patch grid")
    corners = np.arange(grid - scale + 1)
    offsets = (np.arange(scale)[:, None] * grid + np.arange(scale)[None, :]).reshape(-1)
    starts = (corners[:, None] * grid + corners[None, :]).reshape(-1)
    return (starts[:, None] + offsets[None, :]).astype(np.int32)


def anomalous_probability(
    embeddings: jax.Array, text: jax.Array, temperature: float
) -> jax.Array:
    """softmax(cos(x, T) / temperature)[anomalous] of (B, ..., D) embeddings against per-image
    text (B, 2, D) rows [normal, anomalous] -> (B, ...)."""
    x = maps.l2_normalize(embeddings)
    t = maps.l2_normalize(text)
    x2 = x.reshape(x.shape[0], -1, x.shape[-1])
    cos = jnp.einsum("bnd,bkd->bnk", x2, t, precision=_HIGHEST)
    return jax.nn.softmax(cos / temperature, axis=-1)[..., 1].reshape(x.shape[:-1])


def harmonic_map(scores: jax.Array, windows: np.ndarray, grid: int) -> jax.Array:
    """Per patch, the harmonic mean n / sum(1 / s) of the scores of the n windows covering it.

    Args:
      scores: (B, n_windows) window scores (a 0 makes the patches it covers 0).
      windows: (n_windows, s*s) patch indices (`window_indices`).

    Returns:
      (B, grid, grid); a patch no window covers is 0.
    """
    b = scores.shape[0]
    per_patch = jnp.repeat(1.0 / scores, windows.shape[1], axis=1)
    inverse_sum = jnp.zeros((b, grid * grid), scores.dtype).at[:, windows.reshape(-1)].add(
        per_patch)
    count = np.bincount(windows.reshape(-1), minlength=grid * grid).astype(np.float32)
    out = jnp.where(count > 0, count / inverse_sum, 0.0)
    return out.reshape(b, grid, grid)


def split_scales(x: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
    """Splits axis 1 of `x`, the windows of all scales one after the other, into one array per
    scale of `sizes` rows."""
    return jnp.split(x, np.cumsum(sizes)[:-1], axis=1)


def _sizes(windows: Sequence[np.ndarray], k: int = 1) -> list[int]:
    return [k * len(w) for w in windows]


def zero_shot(
    feats: WindowFeatures, text: jax.Array, windows: Sequence[np.ndarray], grid: int,
    temperature: float,
) -> dict[str, Any]:
    """WinCLIP's zero-shot scores (spec section 3).

    Returns: image_score (B,), window_scores [(B, n_windows)] and maps [(B, grid, grid)] per
    scale, map (B, grid, grid) the harmonic mean of the image score and the scale maps.
    """
    image_score = anomalous_probability(feats.image, text, temperature)
    window_scores = [anomalous_probability(w, text, temperature)
                     for w in split_scales(feats.windows, _sizes(windows))]
    scale_maps = [harmonic_map(s, w, grid) for s, w in zip(window_scores, windows, strict=True)]
    parts = [jnp.broadcast_to(image_score[:, None, None], scale_maps[0].shape), *scale_maps]
    combined = len(parts) / sum(1.0 / p for p in parts)
    return {"image_score": image_score, "window_scores": window_scores, "maps": scale_maps,
            "map": combined}


def few_shot(
    feats: WindowFeatures, memory: Mapping[str, jax.Array], windows: Sequence[np.ndarray],
    grid: int,
) -> dict[str, Any]:
    """WinCLIP+'s few-shot scores against per-image memories (spec section 4).

    Args:
      memory: "patches" (B, k * grid^2, C) and "windows" (B, k * W, D), the latter scale after
        scale (`memory_bank`).

    Returns: patch_map (B, grid, grid), window_assoc [(B, n_windows)] and maps per scale, map
    (B, grid, grid) the mean of the patch map and the scale maps.
    """
    b = feats.patches.shape[0]
    patch_map = fewshot.association(feats.patches, memory["patches"]).reshape(b, grid, grid)
    k = memory["windows"].shape[1] // feats.windows.shape[1]
    window_assoc = [
        fewshot.association(w, m) for w, m in zip(
            split_scales(feats.windows, _sizes(windows)),
            split_scales(memory["windows"], _sizes(windows, k)), strict=True)
    ]
    scale_maps = [harmonic_map(a, w, grid) for a, w in zip(window_assoc, windows, strict=True)]
    combined = jnp.stack([patch_map, *scale_maps]).mean(axis=0)
    return {"patch_map": patch_map, "window_assoc": window_assoc, "maps": scale_maps,
            "map": combined}


def memory_bank(refs: WindowFeatures, windows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The memory of k references' features: patches (k * N, C) and windows (k * W, D), the
    windows of all k references scale after scale (what `few_shot` splits)."""
    patches = np.asarray(refs.patches)
    per_scale = [np.asarray(w).reshape(-1, w.shape[-1])
                 for w in split_scales(jnp.asarray(refs.windows), _sizes(windows))]
    return {"patches": patches.reshape(-1, patches.shape[-1]),
            "windows": np.concatenate(per_scale)}


@dataclasses.dataclass(frozen=True)
class ClassInputs:
    """What WinCLIP needs of one class (`prepare_eval`'s adaptation): its prompt word, its
    (2, D) text embeddings and, for WinCLIP+, its reference memory (`memory_bank`)."""

    word: str
    references: int  # k, 0 for zero-shot
    text: np.ndarray = dataclasses.field(repr=False)
    memory: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)


@functools.partial(jax.jit, static_argnums=0)
def _ensemble_means(method: WinCLIP, clip_params: Any, normal: jax.Array, anomalous: jax.Array
                    ) -> jax.Array:
    """(2, D) the mean text features of the (P, T) token ids of each state. The ids are traced:
    one compile serves every class (their prompt counts are the same)."""
    encode = lambda ids: method.clip.apply({"params": clip_params}, ids, method=CLIP.encode_text)
    return jnp.stack([encode(normal).mean(axis=0), encode(anomalous).mean(axis=0)])


class WinCLIP(ConfigKeyed):
    """See `genclip_jax.methods` for the interface; `needs_training = False`: `init` is empty,
    and eval / predict run without a checkpoint.

    Stateless: `prepare_eval` returns each class's text embeddings (and WinCLIP+ memory) as
    host arrays, computed once per class; `host_inputs` hands each image its class's rows.
    """

    name = "winclip"
    # The ensemble names the class; without one it names `winclip.generic_word`.
    needs_class_name = False
    needs_training = False

    def __init__(self, config: ml_collections.ConfigDict, clip_config: CLIPConfig):
        self.config_key = (FrozenConfigDict(config.model), FrozenConfigDict(config.winclip),
                           FrozenConfigDict(config.fewshot), clip_config)
        self.cfg = config.winclip
        self.fewshot_cfg = config.fewshot
        self.k = int(config.fewshot.k)
        self.image_size = config.model.image_size
        self.clip = CLIP(clip_config)
        self.clip_config = clip_config
        self.grid = self.image_size // clip_config.vision_patch_size
        self.windows = [window_indices(self.grid, s) for s in self.cfg.scales]

    def init(self, rng: jax.Array) -> dict:
        """Nothing to learn."""
        del rng
        return {}

    def shape_hints(self, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """No stored params, so no field they could contradict."""
        del shapes
        return []

    def word(self, class_name: str | None) -> str:
        """The class word of the prompts: the dataset name as words, or the generic word."""
        return normalize_class_name(class_name) if class_name else self.cfg.generic_word

    def text_features(
        self, params: dict, clip_params: Any, class_name: str | None = None
    ) -> jax.Array:
        """(2, D) [normal, anomalous]: the plain means of the ensemble's unnormalised text
        features."""
        del params
        normal, anomalous = prompts.token_ids(self.cfg, self.word(class_name),
                                              self.clip_config.context_length)
        return _ensemble_means(self, clip_params, normal, anomalous)

    def encode_images(self, clip_params: Any, images: jax.Array) -> WindowFeatures:
        """Frozen: image, patch and window embeddings (all windows of a scale in one batch)."""
        feats = self.clip.apply({"params": clip_params}, images, self.windows,
                                self.cfg.patch_ln_post, method=CLIP.window_features)
        return jax.lax.stop_gradient(feats)

    def class_image_features(self, clip_params: Any, images: jax.Array) -> jax.Array:
        """Standard CLIP image embeddings (WinCLIP does not adapt to classes by images)."""
        return clip_model.image_embeddings(self.clip_config, clip_params, images)

    def class_inputs(
        self, clip_params: Any, class_name: str, memory: Mapping[str, np.ndarray] | None = None
    ) -> ClassInputs:
        """A class's text embeddings and, with `fewshot.k` > 0, its reference memory (`memory`
        if given). "": the generic word, with the references' only class."""
        text = np.asarray(self.text_features({}, clip_params, class_name or None))
        if self.k and memory is None:
            refs = fewshot.reference_images(self.fewshot_cfg, class_name, self.image_size)
            memory = memory_bank(jax.device_get(steps.encode_images(self, clip_params, refs)),
                                 self.windows)
        return ClassInputs(self.word(class_name), self.k, text.astype(np.float32), memory or {})

    def prepare_eval(
        self, clip_params: Any, class_names: list[str], class_features: Callable[[str], Any]
    ) -> dict[str, ClassInputs]:
        """{class: ClassInputs} of the test classes, so a class's errors (too long for the
        context, too few references) come before any batch; plus "" (the generic word) for
        images with no class name, whose memory is the first class's when there is one (then
        only padding rows have no name)."""
        del class_features
        out = {name: self.class_inputs(clip_params, name) for name in class_names if name}
        first = next(iter(out.values()), None)
        out[""] = self.class_inputs(clip_params, "", first.memory if first else None)
        return out

    def host_inputs(
        self, batch: dict, adaptation: Mapping[str, ClassInputs] | None = None
    ) -> dict[str, np.ndarray]:
        """Per image: its class's text (B, 2, D) and, for WinCLIP+, its memory rows; rows with
        no class name take the generic word's ("")."""
        adaptation = adaptation or {}
        names = [str(n) for n in batch["cls_name"]]
        if missing := sorted({n for n in names if n not in adaptation}):
            raise ValueError(f"winclip: no inputs for the classes {missing} (\"\": the generic "
                             "word): pass the adaptation prepare_eval returns for them (adapted: "
                             f"{sorted(adaptation)})")
        rows = [adaptation[n] for n in names]
        out = {"text": np.stack([r.text for r in rows])}
        if self.k:
            out.update({f"memory_{key}": np.stack([r.memory[key] for r in rows])
                        for key in ("patches", "windows")})
        return out

    def loss(self, params: dict, clip_params: Any, feats: WindowFeatures, batch: dict):
        """Refused: there is nothing to learn (`validate` refuses `train` before this)."""
        del params, clip_params, feats, batch
        raise ValueError("method 'winclip' needs no training (nothing is learned): run "
                         "`genclip-jax eval` or `predict` with this config directly")

    def scores(self, feats: WindowFeatures, batch: dict) -> dict[str, Any]:
        """Zero-shot parts (and "fewshot" parts for k > 0) at the patch grid."""
        out = {"zero_shot": zero_shot(feats, batch["text"], self.windows, self.grid,
                                      self.cfg.temperature)}
        if self.k:
            memory = {"patches": batch["memory_patches"], "windows": batch["memory_windows"]}
            out["fewshot"] = few_shot(feats, memory, self.windows, self.grid)
        return out

    def predict(self, params: dict, clip_params: Any, feats: WindowFeatures, batch: dict) -> dict:
        """Maps (B, S, S) bilinearly upsampled from the patch grid (no blur), image scores (B,)."""
        del params, clip_params
        parts = self.scores(feats, batch)
        grid_map, score = parts["zero_shot"]["map"], parts["zero_shot"]["image_score"]
        if self.k:
            fs_map = parts["fewshot"]["map"]
            grid_map = (grid_map + fs_map) / 2.0
            score = (score + fs_map.max(axis=(1, 2))) / 2.0
        return {"anomaly_map": maps.upsample(grid_map[..., None], self.image_size)[..., 0],
                "image_score": score}
