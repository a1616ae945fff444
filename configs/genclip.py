"""GenCLIP (reconstruction, see README): ViT-L/14@336px at 518, GQP + MVP prompts, CNF, dual branch.

  get_config("mvtec"): train on MVTec AD (test split), evaluate zero-shot on VisA (and MPDD, BTAD,
                       SDD, DAGM, DTD-Synthetic by changing data.test_root).
  get_config("visa"):  train on VisA (test split), evaluate zero-shot on MVTec AD.
"""

from genclip_jax import defaults


def get_config(arg: str = "mvtec"):
    c = defaults.base_config()
    c.method = "genclip"
    if arg == "mvtec":
        c.data.train_root, c.data.test_root = "data/mvtec", "data/visa"
    elif arg == "visa":
        c.data.train_root, c.data.test_root = "data/visa", "data/mvtec"
    else:
        raise ValueError(f"configs/genclip.py: arg must be 'mvtec' or 'visa', got {arg!r}")
    return c
