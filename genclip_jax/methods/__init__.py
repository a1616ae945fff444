"""Anomaly-detection methods behind one interface (see `methods.anomalyclip.AnomalyCLIP`).

A method provides: `init(rng) -> params`, `host_inputs(host_batch) -> dict`,
`encode_images(clip_params, images) -> VisionFeatures` (frozen, cacheable),
`loss(params, clip_params, feats, batch) -> (total, parts)` and
`predict(params, clip_params, feats, batch) -> {"anomaly_map", "image_score"}` and
`prepare_eval(clip_params, class_names, class_features) -> {class: decision}` (test-time
adaptation before evaluation, e.g. GenCLIP's class-name filtering).
"""

from __future__ import annotations

import ml_collections

from genclip_jax.clip.model import CLIPConfig
from genclip_jax.methods.anomalyclip import AnomalyCLIP
from genclip_jax.methods.genclip import GenCLIP

METHODS = {"anomalyclip": AnomalyCLIP, "genclip": GenCLIP}


def create_method(config: ml_collections.ConfigDict, clip_config: CLIPConfig):
    """The method named by `config.method`, built for this backbone."""
    if config.method not in METHODS:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {config.method!r}")
    return METHODS[config.method](config, clip_config)
