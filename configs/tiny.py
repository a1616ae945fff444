"""Tiny random backbone on the synthetic dataset: the offline demo and the CI runs.

  get_config("anomalyclip") (default) or get_config("genclip").
"""

from genclip_jax import defaults


def get_config(arg: str = "anomalyclip"):
    return defaults.tiny_config(arg or "anomalyclip")
