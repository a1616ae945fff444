"""GenCLIP behind the method interface: GQP + MVP prompts, layer-wise maps, dual-branch inference.

Training uses the vision-enhanced prompts only (paper Fig. 2): for each layer i and image b the
text pair T_i[b] comes from GQP + MVP_i(b) with the image's class name, and the layer-i patch map
is supervised with focal + 2 Dice (+ an optional image term). Inference fuses the
vision-enhanced branch (class names after CNF) with the query-only branch (GQP alone, the
generic word): `w * A_vis + (1 - w) * A_q`, then the gaussian blur. Unknowns of the paper are
config fields (`config.genclip`), defaults from the reconstruction (genclip spec section 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import FrozenConfigDict

from genclip_jax import losses, maps
from genclip_jax.clip import model as clip_model
from genclip_jax.clip.model import CLIP, CLIPConfig
from genclip_jax.clip.vision import VisionFeatures
from genclip_jax.methods.config_key import ConfigKeyed
from genclip_jax.prompts import cnf
from genclip_jax.prompts import genclip as prompts

IMAGE_SCORES = ("mix", "global", "max")
IMAGE_TEXT_LAYERS = ("last", "mean")


class GenCLIP(ConfigKeyed):
    """See `genclip_jax.methods` for the interface."""

    name = "genclip"
    needs_class_name = True  # the vision-enhanced prompts name the class (or the generic word)

    def __init__(self, config: ml_collections.ConfigDict, clip_config: CLIPConfig):
        self.config_key = (FrozenConfigDict(config.model), FrozenConfigDict(config.genclip),
                           clip_config)
        self.cfg = config.genclip
        self.image_size = config.model.image_size
        self.clip = CLIP(clip_config)
        self.clip_config = clip_config
        self.patch_layers = tuple(self.cfg.layers)
        self.hidden_layers = tuple(self.cfg.layers)
        if self.cfg.image_score not in IMAGE_SCORES:
            raise ValueError(
                f"genclip.image_score: expected one of {IMAGE_SCORES}, got {self.cfg.image_score!r}"
            )
        if self.cfg.image_text_layer not in IMAGE_TEXT_LAYERS:
            raise ValueError(
                f"genclip.image_text_layer: expected one of {IMAGE_TEXT_LAYERS}, "
                f"got {self.cfg.image_text_layer!r}"
            )
        self.use_mvp = prompts.uses_mvp(self.cfg)
        self.query_ids = jnp.asarray(self._ids(self.cfg.cnf.generic_word))

    @staticmethod
    def _word(class_name: str, decisions: Mapping[str, cnf.Decision] | None = None) -> str:
        """The prompt word of a class: CNF's decision where made, else the name as words."""
        if decisions and class_name in decisions:
            return decisions[class_name].word
        return prompts.normalize_class_name(class_name)

    def _ids(self, word: str) -> np.ndarray:
        return prompts.class_token_ids(self.cfg, word, self.clip_config.context_length)

    @property
    def map_sigma(self) -> float:
        """The maps' blur (the few-shot add-on blurs its map alike)."""
        return float(self.cfg.sigma)

    def init(self, rng: jax.Array) -> dict:
        c = self.clip_config
        return prompts.init(rng, self.cfg, c.vision_width, c.text_width)

    def shape_hints(self, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """The config fields that stored prompt shapes {leaf: shape} contradict, as
        "field=implied value (config: value)" (for restore errors)."""
        cfg, hints = self.cfg, []
        width = self.clip_config.text_width
        stored_width = shapes.get("normal_ctx", (0, width))[-1]
        if stored_width != width:
            hints.append(f"model.clip=<a backbone of text width {stored_width}> (config: text "
                         f"width {width})")
        for field, leaf in (("state_len", "normal_ctx"), ("gqp_len", "gqp")):
            if leaf in shapes and shapes[leaf][0] != cfg[field]:
                hints.append(f"genclip.{field}={shapes[leaf][0]} (config: {cfg[field]})")
        if ("mvp_kernel" in shapes) != self.use_mvp:
            hints.append(f"genclip.use_mvp={'mvp_kernel' in shapes} (config: {self.use_mvp})")
        if "mvp_kernel" in shapes and shapes["mvp_kernel"][0] != len(cfg.layers):
            hints.append(f"genclip.layers=<{shapes['mvp_kernel'][0]} layers> (config: "
                         f"{list(cfg.layers)})")
        depth, length, _ = shapes.get("deep_prompts", (0, cfg.deep_length, width))
        if depth != max(cfg.deep_depth - 1, 0):
            hints.append(f"genclip.deep_depth={depth + 1 if depth else 0} (config: "
                         f"{cfg.deep_depth})")
        if depth and length != cfg.deep_length:
            hints.append(f"genclip.deep_length={length} (config: {cfg.deep_length})")
        return hints

    def host_inputs(
        self, batch: dict, adaptation: Mapping[str, cnf.Decision] | None = None
    ) -> dict:
        """(B, 2, context) prompt ids of each image's class word (after CNF's `adaptation`, if
        given); padding rows get the generic word."""
        words = [self._word(name, adaptation) if name else self.cfg.cnf.generic_word
                 for name in batch["cls_name"]]
        return {"prompt_ids": np.stack([self._ids(w) for w in words]).astype(np.int32)}

    def encode_images(self, clip_params: Any, images: jax.Array) -> VisionFeatures:
        """Frozen: global feature, patch tokens and mean tokens at `genclip.layers`."""
        feats = self.clip.apply(
            {"params": clip_params}, images, self.patch_layers, self.hidden_layers,
            self.cfg.mvp_source, method=CLIP.encode_image,
        )
        return jax.lax.stop_gradient(feats)

    def class_image_features(self, clip_params: Any, images: jax.Array) -> jax.Array:
        """Standard CLIP image embeddings: the image side of CNF rule B, which compares them
        with CLIP text embeddings."""
        return clip_model.image_embeddings(self.clip_config, clip_params, images)

    def text_features(
        self, params: dict, clip_params: Any, class_name: str | None = None
    ) -> jax.Array:
        """(2, D) GQP prompt features for `class_name` as words (None: the generic word; after
        CNF, pass the decision's word), without MVP: the vision-enhanced prompts of an image add
        its MVP tokens to these."""
        word = self._word(class_name) if class_name else self.cfg.cnf.generic_word
        ids = jnp.asarray(self._ids(word))
        return prompts.text_features(self.clip, clip_params, params, ids, self.cfg)

    def branch_text(self, params: dict, clip_params: Any, feats: VisionFeatures,
                    prompt_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Vision-enhanced T_vis (B, L, 2, D) and query-only T_q (2, D), unnormalised.

        Without MVPs (`use_mvp` False) T_vis is the class-word prompt of GQP alone, the same for
        every layer."""
        t_q = prompts.text_features(self.clip, clip_params, params, self.query_ids, self.cfg)
        n_layers = feats.patch_tokens.shape[0]
        if not self.use_mvp:
            t_cls = prompts.text_features(self.clip, clip_params, params, prompt_ids, self.cfg)
            return jnp.broadcast_to(t_cls[:, None], (t_cls.shape[0], n_layers,
                                                     *t_cls.shape[1:])), t_q
        mvp = jnp.swapaxes(prompts.vision_prompts(params, feats.hidden_mean), 0, 1)  # (B, L, Ct)
        ids = jnp.broadcast_to(prompt_ids[:, None], (mvp.shape[0], n_layers,
                                                      *prompt_ids.shape[1:]))
        t_vis = prompts.text_features(self.clip, clip_params, params, ids, self.cfg, mvp)
        return t_vis, t_q

    def forward(self, params: dict, clip_params: Any, feats: VisionFeatures, batch: dict) -> dict:
        """Per-layer probabilities of both branches (L, B, h, w, 2) and image logits (B, 2)."""
        t_vis, t_q = self.branch_text(params, clip_params, feats, batch["prompt_ids"])
        tau = self.cfg.temperature
        probs_vis = jnp.stack([maps.patch_probabilities(f, t_vis[:, i], tau)
                               for i, f in enumerate(feats.patch_tokens)])
        probs_q = jnp.stack([maps.patch_probabilities(f, t_q, tau) for f in feats.patch_tokens])
        t_img = t_vis[:, -1] if self.cfg.image_text_layer == "last" else t_vis.mean(axis=1)
        return {
            "probs_vis": probs_vis,
            "probs_q": probs_q,
            "logits_vis": maps.image_logits(feats.global_feature, t_img, tau),
            "logits_q": maps.image_logits(feats.global_feature, t_q, tau),
        }

    def _upsampled(self, probs: jax.Array) -> jax.Array:
        return jnp.stack([maps.upsample(p, self.image_size) for p in probs])

    def _pixel_loss(self, probs: jax.Array, mask: jax.Array, valid) -> jax.Array:
        return sum(losses.anomalyclip_local_loss(p, mask, valid=valid)
                   for p in self._upsampled(probs))

    def loss(
        self, params: dict, clip_params: Any, feats: VisionFeatures, batch: dict
    ) -> tuple[jax.Array, dict]:
        """sum_layers [focal + dice + dice] (vision-enhanced) + image CE (+ query-only term).

        Pixel terms count the rows with a known mask (`losses.pixel_rows`), CE every real row."""
        out = self.forward(params, clip_params, feats, batch)
        pixel_valid, mask = losses.pixel_rows(batch), batch["mask"]
        local = self._pixel_loss(out["probs_vis"], mask, pixel_valid)
        ce = losses.cross_entropy(out["logits_vis"], batch["label"], valid=batch.get("valid"))
        total = local + self.cfg.image_loss_weight * ce
        if self.cfg.query_loss_weight:
            total = total + self.cfg.query_loss_weight * self._pixel_loss(
                out["probs_q"], mask, pixel_valid)
        return total, {"local": local, "ce": ce, "total": total}

    def branch_maps(self, out: dict) -> tuple[jax.Array, jax.Array]:
        """Unblurred (B, S, S) maps of the vision-enhanced and the query-only branch."""
        reduce = self.cfg.map_reduce
        return (maps.anomaly_map(self._upsampled(out["probs_vis"]), reduce=reduce),
                maps.anomaly_map(self._upsampled(out["probs_q"]), reduce=reduce))

    def predict(self, params: dict, clip_params: Any, feats: VisionFeatures, batch: dict) -> dict:
        """Fused, blurred anomaly maps (B, S, S) and image scores (B,)."""
        out = self.forward(params, clip_params, feats, batch)
        a_vis, a_q = self.branch_maps(out)
        w = self.cfg.fusion_w
        fused = maps.gaussian_blur(w * a_vis + (1.0 - w) * a_q, self.map_sigma)
        global_score = w * maps.image_score(out["logits_vis"]) + (1.0 - w) * maps.image_score(
            out["logits_q"])
        pixel_max = fused.max(axis=(1, 2))
        mix = self.cfg.image_score_mix
        score = {"global": global_score, "max": pixel_max,
                 "mix": (1.0 - mix) * global_score + mix * pixel_max}[self.cfg.image_score]
        return {"anomaly_map": fused, "image_score": score}

    def prepare_eval(
        self,
        clip_params: Any,
        class_names: list[str],
        class_features: Callable[[str], np.ndarray],
    ) -> dict[str, cnf.Decision]:
        """CNF's decision for each test class, for `host_inputs`; `class_features(name)` gives a
        class's (N, D) image embeddings from `class_image_features` (called only by rule B)."""
        cfg = self.cfg.cnf
        return {
            name: cnf.decide(
                name, cfg, clip=self.clip, clip_params=clip_params,
                image_features=class_features(name) if cfg.rule == "B" else None,
                context_length=self.clip_config.context_length,
            )
            for name in class_names
        }
