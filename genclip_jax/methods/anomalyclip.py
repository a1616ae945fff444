"""AnomalyCLIP behind the method interface: object-agnostic prompts, DPAM patch maps.

Training: `4 * sum_layers [focal + dice(abn, gt) + dice(nor, 1 - gt)] + CE(image logits)`.
Inference: per-layer abnormal probabilities upsampled, summed over layers, gaussian sigma=4; the
image score is `softmax(g @ T / 0.07)[abnormal]` of the global feature alone (spec sections 4-5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import FrozenConfigDict

from genclip_jax import losses, maps
from genclip_jax.clip import model as clip_model
from genclip_jax.clip.model import CLIP, CLIPConfig
from genclip_jax.clip.vision import VisionFeatures
from genclip_jax.methods.config_key import ConfigKeyed
from genclip_jax.prompts import anomalyclip as prompts


class AnomalyCLIP(ConfigKeyed):
    """Method interface (shared with GenCLIP) so that train/eval never branch on the method.

    `encode_images` is the frozen part (cacheable); `loss` and `predict` take its output.
    """

    name = "anomalyclip"
    needs_class_name = False  # object-agnostic prompts

    def __init__(self, config: ml_collections.ConfigDict, clip_config: CLIPConfig):
        self.config_key = (FrozenConfigDict(config.model), FrozenConfigDict(config.anomalyclip),
                           FrozenConfigDict(config.prompts), clip_config)
        self.cfg = config.anomalyclip
        self.prompt_cfg = config.prompts
        self.image_size = config.model.image_size
        self.clip = CLIP(clip_config)
        self.clip_config = clip_config
        self.text_width = clip_config.text_width
        self.patch_layers = tuple(self.cfg.features_list)
        self.hidden_layers: tuple[int, ...] = ()
        self.token_ids = jnp.asarray(
            prompts.template_ids(self.prompt_cfg, clip_config.context_length)
        )

    @property
    def map_sigma(self) -> float:
        """The maps' blur (the few-shot add-on blurs its map alike)."""
        return float(self.cfg.sigma)

    def init(self, rng: jax.Array) -> dict:
        return prompts.init(rng, self.prompt_cfg, self.text_width)

    def shape_hints(self, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """The config fields that stored prompt shapes {leaf: shape} contradict, as
        "field=implied value (config: value)" (for restore errors)."""
        cfg, hints = self.prompt_cfg, []
        if len(shapes.get("ctx_pos", ())) == 2:
            n_ctx, width = shapes["ctx_pos"]
            if width != self.text_width:
                hints.append(f"model.clip=<a backbone of text width {width}> (config: text "
                             f"width {self.text_width})")
            if n_ctx != cfg.n_ctx:
                hints.append(f"prompts.n_ctx={n_ctx} (config: {cfg.n_ctx})")
        if len(shapes.get("deep_prompts", ())) == 3:
            depth, length, _ = shapes["deep_prompts"]
            if depth != max(cfg.deep_depth - 1, 0):
                hints.append(f"prompts.deep_depth={depth + 1} (config: {cfg.deep_depth})")
            if depth and length != cfg.deep_length:
                hints.append(f"prompts.deep_length={length} (config: {cfg.deep_length})")
        return hints

    def host_inputs(self, batch: dict, adaptation: Mapping[str, Any] | None = None) -> dict:
        """Extra numeric arrays the device step needs from host metadata (none here)."""
        del batch, adaptation
        return {}

    def prepare_eval(self, clip_params: Any, class_names: list[str], class_features) -> dict:
        """Nothing to adapt: the prompts never name the class."""
        del clip_params, class_names, class_features
        return {}

    def encode_images(self, clip_params: Any, images: jax.Array) -> VisionFeatures:
        """Frozen vision forward: global feature + V-V patch tokens at `features_list`."""
        feats = self.clip.apply(
            {"params": clip_params}, images, self.patch_layers, self.hidden_layers,
            method=CLIP.encode_image,
        )
        return jax.lax.stop_gradient(feats)

    def class_image_features(self, clip_params: Any, images: jax.Array) -> jax.Array:
        """Standard CLIP image embeddings (AnomalyCLIP does not adapt to classes: unused by its
        `prepare_eval`, there for the interface)."""
        return clip_model.image_embeddings(self.clip_config, clip_params, images)

    def text_features(
        self, params: dict, clip_params: Any, class_name: str | None = None
    ) -> jax.Array:
        """(2, D) unnormalised [normal, abnormal] text features; object-agnostic: the same for
        every `class_name`."""
        del class_name
        return prompts.text_features(
            self.clip, clip_params, params, self.token_ids, self.prompt_cfg
        )

    def forward(self, params: dict, clip_params: Any, feats: VisionFeatures) -> dict:
        """Per-layer patch probabilities (L, B, h, w, 2) and image logits (B, 2)."""
        text = self.text_features(params, clip_params)
        tau = self.cfg.temperature
        probs = jnp.stack([maps.patch_probabilities(f, text, tau) for f in feats.patch_tokens])
        return {"probs": probs, "image_logits": maps.image_logits(feats.global_feature, text, tau)}

    def upsampled(self, probs: jax.Array) -> jax.Array:
        """(L, B, h, w, 2) -> (L, B, S, S, 2) at the input image size."""
        return jnp.stack([maps.upsample(p, self.image_size) for p in probs])

    def loss(
        self, params: dict, clip_params: Any, feats: VisionFeatures, batch: dict
    ) -> tuple[jax.Array, dict]:
        """Total loss and its pieces; padded rows (`batch["valid"]` False) do not count, rows
        without a mask (`batch["has_mask"]` False) count in the image loss only."""
        out = self.forward(params, clip_params, feats)
        valid, pixel_valid = batch.get("valid"), losses.pixel_rows(batch)
        mask = batch["mask"]
        focal, dice_abn, dice_nor = [], [], []
        for layer_maps in self.upsampled(out["probs"]):
            focal.append(losses.focal_loss(layer_maps, mask, valid=pixel_valid))
            dice_abn.append(losses.dice_loss(layer_maps[..., 1], mask, valid=pixel_valid))
            dice_nor.append(losses.dice_loss(layer_maps[..., 0], 1.0 - mask, valid=pixel_valid))
        parts = {
            "focal": jnp.stack(focal), "dice_abn": jnp.stack(dice_abn),
            "dice_nor": jnp.stack(dice_nor),
        }
        local = sum(p.sum() for p in parts.values())
        ce = losses.cross_entropy(out["image_logits"], batch["label"], valid=valid)
        total = self.cfg.local_loss_weight * local + ce
        return total, {**parts, "local": local, "ce": ce, "total": total}

    def predict(self, params: dict, clip_params: Any, feats: VisionFeatures, batch: dict) -> dict:
        """Blurred anomaly maps (B, S, S) and image scores (B,)."""
        del batch
        out = self.forward(params, clip_params, feats)
        raw = maps.anomaly_map(self.upsampled(out["probs"]), reduce=self.cfg.map_reduce)
        return {
            "anomaly_map": maps.gaussian_blur(raw, self.map_sigma),
            "image_score": maps.image_score(out["image_logits"]),
        }
