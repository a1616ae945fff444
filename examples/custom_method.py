"""A third method, defined outside the package against `genclip_jax.Method` and run by the
library's own training and evaluation on a synthetic set (tiny random CLIP, offline):

    python examples/custom_method.py /tmp/prototypes

No text prompt at all: two learned prototypes in CLIP's joint space, one for normal and one for
abnormal patches; a patch's softmax over its similarity to them is its anomaly probability.
"""

import pathlib
import sys

import jax

import genclip_jax
from genclip_jax import losses, maps


class Prototypes:
    name = "prototypes"
    needs_class_name = False

    def __init__(self, config, clip_config):
        self.clip, self.clip_config = genclip_jax.CLIP(clip_config), clip_config
        self.layer, self.size = config.anomalyclip.features_list[-1], config.model.image_size

    def init(self, rng):
        return {"prototypes": 0.02 * jax.random.normal(rng, (2, self.clip_config.embed_dim))}

    def host_inputs(self, batch, adaptation=None):
        return {}

    def encode_images(self, clip_params, images):
        feats = self.clip.apply({"params": clip_params}, images, (self.layer,),
                                method=genclip_jax.CLIP.encode_image)
        return jax.lax.stop_gradient(feats)

    def class_image_features(self, clip_params, images):
        return self.encode_images(clip_params, images).global_feature

    def prepare_eval(self, clip_params, class_names, class_features):
        return {}

    def text_features(self, params, clip_params, class_name=None):
        return params["prototypes"]

    def shape_hints(self, shapes):
        return []

    def _probs(self, params, feats):  # (B, S, S, 2)
        probs = maps.patch_probabilities(feats.patch_tokens[-1], params["prototypes"])
        return maps.upsample(probs, self.size)

    def loss(self, params, clip_params, feats, batch):
        probs, valid = self._probs(params, feats), batch.get("valid")
        local = losses.anomalyclip_local_loss(probs, batch["mask"], valid=valid)
        logits = maps.image_logits(feats.global_feature, params["prototypes"])
        ce = losses.cross_entropy(logits, batch["label"], valid=valid)
        return local + ce, {"local": local, "ce": ce, "total": local + ce}

    def predict(self, params, clip_params, feats, batch):
        anomaly_map = maps.gaussian_blur(maps.anomaly_map(self._probs(params, feats)[None]))
        return {"anomaly_map": anomaly_map, "image_score": anomaly_map.max(axis=(1, 2))}


def main(workdir: pathlib.Path) -> dict:
    genclip_jax.register_method("prototypes", Prototypes)
    data = workdir / "data"
    if not (data / "meta.json").exists():
        genclip_jax.write_synthetic_dataset(data, image_size=112)
    config = genclip_jax.base_config()
    config.method = "prototypes"
    config.model.clip, config.model.image_size = "random", 112  # a tiny random CLIP
    config.data.train_root = config.data.test_root = str(data)
    config.train.epochs, config.train.progress = 2, False
    return genclip_jax.train_and_evaluate(config, str(workdir / "run"))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/genclip_prototypes"))
