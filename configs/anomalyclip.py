"""AnomalyCLIP, the official recipe: ViT-L/14@336px at 518, prompts trained 15 epochs.

  get_config("visa"):  train on VisA (test split), evaluate zero-shot on MVTec AD (paper Table 1).
  get_config("mvtec"): train on MVTec AD (test split), evaluate zero-shot on VisA.

Point the dataset roots at folders holding a meta.json (`genclip-jax make-meta`):
  --config.data.train_root=/data/visa --config.data.test_root=/data/mvtec
"""

from genclip_jax import defaults


def get_config(arg: str = "visa"):
    c = defaults.base_config()
    c.method = "anomalyclip"
    if arg == "visa":
        c.data.train_root, c.data.test_root = "data/visa", "data/mvtec"
    elif arg == "mvtec":
        c.data.train_root, c.data.test_root = "data/mvtec", "data/visa"
    else:
        raise ValueError(f"configs/anomalyclip.py: arg must be 'visa' or 'mvtec', got {arg!r}")
    return c
