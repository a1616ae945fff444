"""GenCLIP (reconstruction, see README): ViT-L/14@336px at 518, GQP + MVP prompts, CNF, dual branch.

  get_config("mvtec"): train on MVTec AD (test split), evaluate zero-shot on VisA (and MPDD, BTAD,
                       SDD, DAGM, DTD-Synthetic by changing data.test_root).
  get_config("visa"):  train on VisA (test split), evaluate zero-shot on MVTec AD.
"""

from genclip_jax import config_overrides, defaults

ARGS = ("mvtec", "visa")


def get_config(arg: str = "mvtec"):
    config_overrides.check_config_arg("configs/genclip.py", arg, ARGS)
    c = defaults.base_config()
    c.method = "genclip"
    if arg == "mvtec":
        c.data.train_root, c.data.test_root = "data/mvtec", "data/visa"
    else:
        c.data.train_root, c.data.test_root = "data/visa", "data/mvtec"
    return c
