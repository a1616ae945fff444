"""Anomaly-detection methods behind one interface (see `methods.anomalyclip.AnomalyCLIP`).

A method provides: `init(rng) -> params`, `host_inputs(host_batch) -> dict`,
`encode_images(clip_params, images) -> VisionFeatures` (frozen, cacheable),
`loss(params, clip_params, feats, batch) -> (total, parts)` and
`predict(params, clip_params, feats, batch) -> {"anomaly_map", "image_score"}`.
"""

from __future__ import annotations

import ml_collections

from genclip_jax.clip.model import CLIPConfig
from genclip_jax.methods.anomalyclip import AnomalyCLIP

METHODS = {"anomalyclip": AnomalyCLIP}


def create_method(config: ml_collections.ConfigDict, clip_config: CLIPConfig):
    """The method named by `config.method`, built for this backbone."""
    if config.method not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {config.method!r}")
    return METHODS[config.method](config, clip_config)
