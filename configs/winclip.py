"""WinCLIP / WinCLIP+, anomalib's setting: open_clip ViT-B-16-plus-240 (laion400m_e31) at 240,
the 21-template prompt ensemble, windows of 2x2 and 3x3 patches. Nothing is trained.

  get_config("mvtec"): evaluate on MVTec AD (data/mvtec).
  get_config("visa"):  evaluate on VisA (data/visa).

Zero-shot: `genclip-jax eval --config=configs/winclip.py:mvtec --workdir=runs/winclip`;
WinCLIP+ adds `--config.fewshot.k=4 --config.fewshot.reference=/data/mvtec` (the train split's
good images of each class).
"""

from genclip_jax import config_overrides, defaults

ARGS = ("mvtec", "visa")


def get_config(arg: str = "mvtec"):
    config_overrides.check_config_arg("configs/winclip.py", arg, ARGS)
    return defaults.winclip_config(arg)
