"""Tiny random backbone on the synthetic dataset: the offline demo and the CI runs.

  get_config("anomalyclip") (default), get_config("genclip") or get_config("winclip") (nothing
  to train: the demo only evaluates).
"""

from genclip_jax import config_overrides, defaults

ARGS = ("anomalyclip", "genclip", "winclip")


def get_config(arg: str = "anomalyclip"):
    arg = arg or "anomalyclip"
    config_overrides.check_config_arg("configs/tiny.py", arg, ARGS)
    return defaults.tiny_config(arg)
