"""Few-shot references: k normal images per class, and the nearest-neighbour association of
frozen embeddings to a memory of them.

Method-independent (DESIGN section 7). `fewshot.reference` is a dataset root with meta.json (the
good images of `fewshot.split`, per class), a good/defect folder (`REF/<class>/good/**`) or a
folder of class folders (`REF/<class>/**/image`); k of a class's images are drawn with
`fewshot.seed` (the papers' protocol: a seeded sample of the train split's good images), so a
run is reproducible and `eval` never takes them from the test images.

Two users: WinCLIP+ turns the images into its own memory (window and patch embeddings) and
scores with `association`; every method whose features are `VisionFeatures` (AnomalyCLIP,
GenCLIP: the `PatchMethod` protocol) gets the add-on `References`: the frozen patch tokens of a
class's references form a memory bank kept on device, each test patch's distance
`1 - max cos` to it (averaged over `fewshot.layers`, upsampled and blurred like the zero-shot
map) is fused into the method's map, and its maximum into the image score.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from genclip_jax import maps, parallel, steps
from genclip_jax.clip.vision import VisionFeatures
from genclip_jax.data import image_sets, pipeline

_HIGHEST = jax.lax.Precision.HIGHEST


def reference_paths(reference: str, split: str = "train") -> dict[str, list[pathlib.Path]]:
    """{class: sorted normal image paths} of an image set (`image_sets.image_set`: a meta.json
    root's `split`, a good/defect folder's good images, or a folder of class folders)."""
    found: dict[str, list[pathlib.Path]] = {}
    for e in image_sets.image_set(reference, "normal", "fewshot.reference", split):
        found.setdefault(e["cls_name"], []).append(pathlib.Path(reference) / e["img_path"])
    return {cls: sorted(paths) for cls, paths in found.items()}


def class_of(paths: Mapping[str, list[pathlib.Path]], class_name: str, source: str) -> str:
    """The references' class for images of `class_name` ("" = the only class there is).

    Raises ValueError when the references hold no such class."""
    if not class_name:
        if len(paths) != 1:
            raise ValueError(f"fewshot.reference {source}: the images' class is unknown and the "
                             f"references hold {len(paths)} classes {sorted(paths)}; give the "
                             "class (or references of one class)")
        return next(iter(paths))
    if class_name not in paths:
        raise ValueError(f"fewshot.reference {source}: no reference images of class "
                         f"{class_name!r} (classes there: {sorted(paths)})")
    return class_name


def select(
    paths: Mapping[str, list[pathlib.Path]], class_name: str, k: int, source: str, seed: int = 0
) -> list[pathlib.Path]:
    """`k` reference images of `class_name` ("" = the only class there is), drawn without
    replacement by a generator seeded with (`seed`, the class), returned in path order.

    Raises ValueError naming the class, k and the count when there are fewer than k."""
    class_name = class_of(paths, class_name, source)
    available = paths[class_name]
    if k > len(available):
        raise ValueError(f"fewshot.reference {source}: class {class_name!r} has {len(available)} "
                         f"normal reference images, fewer than fewshot.k={k}")
    rng = np.random.default_rng([seed, zlib.crc32(class_name.encode())])
    return [available[i] for i in sorted(rng.choice(len(available), k, replace=False))]


def chosen_files(cfg: ml_collections.ConfigDict, class_names: Sequence[str]
                 ) -> set[pathlib.Path]:
    """The resolved paths of every reference `cfg` picks for `class_names` (errors as `select`):
    what must not be scored as if unseen (calibration images)."""
    paths = reference_paths(cfg.reference, cfg.split)
    return {p.resolve() for name in dict.fromkeys(class_names)
            for p in select(paths, name, cfg.k, cfg.reference, cfg.seed)}


def reference_images(
    cfg: ml_collections.ConfigDict, class_name: str, image_size: int
) -> np.ndarray:
    """(k, S, S, 3) uint8 resized reference images of `class_name` per `cfg` (`fewshot.*`)."""
    paths = reference_paths(cfg.reference, cfg.split)
    chosen = select(paths, class_name, cfg.k, cfg.reference, cfg.seed)
    return np.stack([pipeline.resize_image(pipeline.read_image(p), image_size, str(p))
                     for p in chosen])


def label(cfg: ml_collections.ConfigDict) -> str:
    """What names few-shot results (tables, eval folders): "4shot_seed0"; "" for zero-shot."""
    return f"{cfg.k}shot_seed{cfg.seed}" if cfg.k else ""


def association(queries: jax.Array, memory: jax.Array) -> jax.Array:
    """Distance of each query to its nearest memory row: min_m (1 - cos(q, m)) / 2.

    Args:
      queries: (B, N, D) embeddings.
      memory: (B, M, D) reference embeddings per image (M = k * rows per reference).

    Returns:
      (B, N) values in [0, 1]; ~0 where a query equals a reference row up to scale.
    """
    q = queries / jnp.linalg.norm(queries, axis=-1, keepdims=True)
    m = memory / jnp.linalg.norm(memory, axis=-1, keepdims=True)
    cos = jnp.einsum("bnd,bmd->bnm", q, m, precision=_HIGHEST)
    # Clipped: rounding puts the cosine of a query with itself a hair above 1, and a negative
    # distance would make harmonic means of distances (WinCLIP+) blow up instead of reach 0.
    return ((1.0 - jnp.clip(cos, -1.0, 1.0)) / 2.0).min(axis=-1)


# ----------------------------------------------------------------------------------------------
# The add-on for methods with `VisionFeatures`: a per-class memory bank of patch tokens.


@runtime_checkable
class PatchMethod(Protocol):
    """What the few-shot add-on needs of a method besides `Method`: `encode_images` returns
    `VisionFeatures` whose patch tokens are taken at `patch_layers`, maps are at `image_size`
    and blurred with `map_sigma`."""

    patch_layers: tuple[int, ...]
    image_size: int
    map_sigma: float

    def encode_images(self, clip_params: Any, images: jax.Array) -> VisionFeatures: ...

    def predict(self, params: Any, clip_params: Any, feats: VisionFeatures, batch: dict
                ) -> dict[str, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static part of the fused inference (hashable: a jit static argument). The weights
    are traced instead: another `fewshot.weight` reuses the compiled step."""

    layers: tuple[int, ...]  # positions of `fewshot.layers` in the method's patch layers
    sigma: float  # the method's blur
    image_size: int


def make_spec(cfg: ml_collections.ConfigDict, method: PatchMethod) -> Spec:
    """`fewshot.*` for `method`; `fewshot.layers` must be among the layers its features hold."""
    have = tuple(method.patch_layers)
    chosen = tuple(cfg.layers) or have
    if missing := [layer for layer in chosen if layer not in have]:
        raise ValueError(f"fewshot.layers: {missing} are not patch layers of method "
                         f"{getattr(method, 'name', method)!r}, whose features hold the layers "
                         f"{list(have)}; pick among those (empty: all of them)")
    return Spec(tuple(have.index(layer) for layer in chosen), float(method.map_sigma),
                int(method.image_size))


def memory_bank(patch_tokens: np.ndarray, chunk_rows: int) -> np.ndarray:
    """A class's memory: the unit-norm patch rows of its references, in chunks.

    Args:
      patch_tokens: (L, k, N, D) tokens of the k references at the few-shot layers, CLS row
        first (dropped).
      chunk_rows: rows per chunk R (at most k * (N - 1)).

    Returns:
      (C, L, R, D) float32; the last chunk is padded with copies of the first row, which never
      changes a maximum.
    """
    n_layers, k, n, dim = patch_tokens.shape
    rows = patch_tokens[:, :, 1:].reshape(n_layers, k * (n - 1), dim).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    chunk = min(chunk_rows, rows.shape[1])
    pad = -rows.shape[1] % chunk
    rows = np.concatenate([rows, np.repeat(rows[:, :1], pad, axis=1)], axis=1)
    return rows.reshape(n_layers, -1, chunk, dim).transpose(1, 0, 2, 3)


def nearest_distance(patch_tokens: jax.Array, bank: jax.Array) -> jax.Array:
    """Each test patch's cosine distance to the nearest reference patch, averaged over layers.

    One matmul per chunk of the bank (a scan keeps the running maximum), so memory grows with
    the chunk, not with k.

    Args:
      patch_tokens: (L, B, N, D) test tokens at the few-shot layers, CLS row first (dropped);
        N - 1 = h * h.
      bank: (C, L, R, D) `memory_bank` of the class.

    Returns:
      (B, h, h) `mean_l (1 - max_m cos(q_l, m_l))`, in [0, 2]; 0 where a patch is in the bank.
    """
    queries = maps.l2_normalize(patch_tokens[:, :, 1:].astype(jnp.float32))

    def best_of(best: jax.Array, chunk: jax.Array) -> tuple[jax.Array, None]:
        cos = jnp.einsum("lbpd,lrd->lbpr", queries, chunk, precision=_HIGHEST)
        return jnp.maximum(best, cos.max(axis=-1)), None

    best, _ = jax.lax.scan(best_of, jnp.full(queries.shape[:3], -1.0, jnp.float32), bank)
    distance = (1.0 - jnp.clip(best, -1.0, 1.0)).mean(axis=0)
    side = math.isqrt(distance.shape[-1])
    return distance.reshape(distance.shape[0], side, side)


def fuse(out: Mapping[str, jax.Array], patch_tokens: jax.Array, bank: jax.Array, spec: Spec,
         weight: jax.Array | float, image_weight: jax.Array | float) -> dict[str, jax.Array]:
    """The method's zero-shot `out` with the few-shot map of `patch_tokens` (L, B, N, D, all the
    method's patch layers) fused in: `(1 - weight) * map + weight * few_shot` and
    `image_score + image_weight * max(few_shot)`; the few-shot map is upsampled to the image
    size and blurred like the method's."""
    grid = nearest_distance(patch_tokens[jnp.asarray(spec.layers)], bank)
    few = maps.gaussian_blur(maps.upsample(grid[..., None], spec.image_size)[..., 0], spec.sigma)
    return {
        "anomaly_map": (1.0 - weight) * out["anomaly_map"] + weight * few,
        "image_score": out["image_score"] + image_weight * few.max(axis=(1, 2)),
    }


@functools.partial(jax.jit, static_argnums=(0, 1))
def predict(method: PatchMethod, spec: Spec, params: Any, clip_params: Any, images: jax.Array,
            batch: dict, bank: jax.Array, weight: jax.Array | float,
            image_weight: jax.Array | float) -> dict[str, jax.Array]:
    """`steps.predict` with the class's memory `bank` fused in (`fuse`); one vision forward."""
    feats = method.encode_images(clip_params, images)
    return fuse(method.predict(params, clip_params, feats, batch), feats.patch_tokens, bank, spec,
                weight, image_weight)


class References:
    """A model's few-shot memory: per class, its references' bank, built on first use from
    `fewshot.reference` and kept on device (replicated over the mesh)."""

    def __init__(self, cfg: ml_collections.ConfigDict, method: PatchMethod, clip_params: Any,
                 mesh: Mesh, batch_size: int) -> None:
        self.cfg = cfg
        self.spec = make_spec(cfg, method)
        self.method = method
        self._clip_params = clip_params
        self._mesh = mesh
        self._batch_size = batch_size
        self._banks: dict[str, jax.Array] = {}

    @functools.cached_property
    def paths(self) -> dict[str, list[pathlib.Path]]:
        return reference_paths(self.cfg.reference, self.cfg.split)

    def check(self, class_names: Sequence[str]) -> None:
        """Raises before any batch when a class has no (or too few) references."""
        for name in dict.fromkeys(class_names):
            select(self.paths, name, self.cfg.k, self.cfg.reference, self.cfg.seed)

    def _encode(self, images: np.ndarray) -> np.ndarray:
        """(L, k, N, D) patch tokens of all few-shot layers of `images` (k, S, S, 3), encoded
        in global batches of the evaluation's size (every host holds all k images)."""
        k, size = len(images), self._batch_size
        padded = np.zeros((-(-k // size) * size, *images.shape[1:]), images.dtype)
        padded[:k] = images
        layers = np.asarray(self.spec.layers)
        parts = []
        for start in range(0, len(padded), size):
            chunk = parallel.distribute(padded[start:start + size], self._mesh)
            feats = steps.encode_images(self.method, self._clip_params, chunk)
            parts.append(parallel.gather(feats.patch_tokens)[layers])
        return np.concatenate(parts, axis=1)[:, :k]

    def bank(self, class_name: str, keep_others: bool = False) -> jax.Array:
        """The device bank of `class_name`'s references; built once. `keep_others=False` frees
        the other classes' banks first (evaluation meets the classes one after another)."""
        name = class_of(self.paths, class_name, self.cfg.reference)
        if name not in self._banks:
            if not keep_others:
                self._banks.clear()
            refs = reference_images(self.cfg, name, self.spec.image_size)
            self._banks[name] = parallel.replicate(
                memory_bank(self._encode(refs), self.cfg.chunk_rows), self._mesh)
        return self._banks[name]

    def predict(self, params: Any, images: jax.Array, batch: dict, class_name: str,
                keep_others: bool = False) -> dict[str, jax.Array]:
        """The fused outputs of a batch whose images are all of `class_name`."""
        return predict(self.method, self.spec, params, self._clip_params, images, batch,
                       self.bank(class_name, keep_others), float(self.cfg.weight),
                       float(self.cfg.image_weight))
