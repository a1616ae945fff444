"""A method's jitted inference steps, compiled once per (method, config).

Each takes the method as a static argument; built-in methods of equal config compare equal
(`methods.config_key`), so a second model, run or ablation seed with the same config and shapes
reuses the compiled programs instead of tracing them again.
"""

from __future__ import annotations

import functools

import jax

from genclip_jax.clip.vision import VisionFeatures


@functools.partial(jax.jit, static_argnums=0)
def encode_images(method, clip_params, images: jax.Array) -> VisionFeatures:
    """The frozen vision features of images (B, S, S, 3): uint8 pixels or normalised floats."""
    return method.encode_images(clip_params, images)


@functools.partial(jax.jit, static_argnums=0)
def predict(method, params, clip_params, images: jax.Array, batch: dict) -> dict:
    """{"anomaly_map": (B, S, S), "image_score": (B,)} of images (B, S, S, 3) (uint8 pixels or
    normalised floats)."""
    return method.predict(params, clip_params, method.encode_images(clip_params, images), batch)


@functools.partial(jax.jit, static_argnums=0)
def class_image_features(method, clip_params, images: jax.Array) -> jax.Array:
    """(B, D) the method's image embeddings for test-time adaptation."""
    return method.class_image_features(clip_params, images)


@functools.partial(jax.jit, static_argnums=(0, 3))
def text_features(method, params, clip_params, class_name: str | None) -> jax.Array:
    """(2, D) [normal, abnormal] text features (see `Method.text_features`)."""
    return method.text_features(params, clip_params, class_name)
