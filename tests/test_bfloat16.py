"""The bf16 path: towers in bfloat16, features/similarities/maps in float32, maps close to fp32."""

import jax
import jax.numpy as jnp
import numpy as np

from genclip_jax import defaults
from genclip_jax.backbone import load_backbone
from genclip_jax.methods import create_method


def test_bfloat16_towers_give_float32_maps_close_to_fp32():
    outputs = {}
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 112, 112, 3))
    for dtype in ("float32", "bfloat16"):
        config = defaults.tiny_config()
        config.model.compute_dtype = dtype
        clip_config, clip_params = load_backbone(config.model)
        method = create_method(config, clip_config)
        params = method.init(jax.random.PRNGKey(0))
        feats = method.encode_images(clip_params, images)
        assert {f.dtype for f in jax.tree.leaves(feats)} == {jnp.dtype(jnp.float32)}
        outputs[dtype] = method.predict(params, clip_params, feats, {})
    for key in ("anomaly_map", "image_score"):
        assert outputs["bfloat16"][key].dtype == jnp.float32
        diff = np.abs(np.asarray(outputs["bfloat16"][key]) - np.asarray(outputs["float32"][key]))
        assert 0 < diff.max() < 0.05, (key, diff.max())
