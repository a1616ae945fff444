"""AnomalyCLIP, the official recipe: ViT-L/14@336px at 518, prompts trained 15 epochs.

  get_config("visa"):  train on VisA (test split), evaluate zero-shot on MVTec AD (paper Table 1).
  get_config("mvtec"): train on MVTec AD (test split), evaluate zero-shot on VisA.

Point the dataset roots at folders holding a meta.json (`genclip-jax make-meta`):
  --config.data.train_root=/data/visa --config.data.test_root=/data/mvtec
"""

from genclip_jax import config_overrides, defaults

ARGS = ("visa", "mvtec")


def get_config(arg: str = "visa"):
    config_overrides.check_config_arg("configs/anomalyclip.py", arg, ARGS)
    c = defaults.base_config()
    c.method = "anomalyclip"
    if arg == "visa":
        c.data.train_root, c.data.test_root = "data/visa", "data/mvtec"
    else:
        c.data.train_root, c.data.test_root = "data/mvtec", "data/visa"
    return c
