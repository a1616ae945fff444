"""Few-shot references: k normal images per class, and the nearest-neighbour association of
frozen embeddings to a memory of them.

Method-independent (DESIGN section 7): a method turns the images `reference_images` picks into
its own memory bank (WinCLIP+: window and patch embeddings) and scores with `association`.
`fewshot.reference` is a dataset root with meta.json (the good images of `fewshot.split`, per
class), a good/defect folder (`REF/<class>/good/**`) or a folder of class folders
(`REF/<class>/**/image`); the first k in path order are used, so a run is reproducible.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genclip_jax.data import image_sets, pipeline

_HIGHEST = jax.lax.Precision.HIGHEST


def reference_paths(reference: str, split: str = "train") -> dict[str, list[pathlib.Path]]:
    """{class: sorted normal image paths} of an image set (`image_sets.image_set`: a meta.json
    root's `split`, a good/defect folder's good images, or a folder of class folders)."""
    found: dict[str, list[pathlib.Path]] = {}
    for e in image_sets.image_set(reference, "normal", "fewshot.reference", split):
        found.setdefault(e["cls_name"], []).append(pathlib.Path(reference) / e["img_path"])
    return {cls: sorted(paths) for cls, paths in found.items()}


def select(
    paths: Mapping[str, list[pathlib.Path]], class_name: str, k: int, source: str
) -> list[pathlib.Path]:
    """The first `k` reference images of `class_name` ("" = the only class there is).

    Raises ValueError naming the class, k and the count when there are fewer than k."""
    if not class_name:
        if len(paths) != 1:
            raise ValueError(f"fewshot.reference {source}: the images' class is unknown and the "
                             f"references hold {len(paths)} classes {sorted(paths)}; give the "
                             "class (or references of one class)")
        class_name = next(iter(paths))
    if class_name not in paths:
        raise ValueError(f"fewshot.reference {source}: no reference images of class "
                         f"{class_name!r} (classes there: {sorted(paths)})")
    available = paths[class_name]
    if k > len(available):
        raise ValueError(f"fewshot.reference {source}: class {class_name!r} has {len(available)} "
                         f"normal reference images, fewer than fewshot.k={k}")
    return available[:k]


def reference_images(
    cfg: ml_collections.ConfigDict, class_name: str, image_size: int
) -> np.ndarray:
    """(k, S, S, 3) CLIP-normalised reference images of `class_name` per `cfg` (`fewshot.*`)."""
    paths = reference_paths(cfg.reference, cfg.split)
    chosen = select(paths, class_name, cfg.k, cfg.reference)
    return np.stack([pipeline.image_transform(pipeline.read_image(p), image_size, str(p))
                     for p in chosen])


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
