"""Offline end-to-end demo: synthetic MVTec-style data, tiny random CLIP, train then evaluate."""

from __future__ import annotations

import pathlib

import ml_collections

from genclip_jax import evaluate, train_eval
from genclip_jax.data import synthetic
from genclip_jax.methods import needs_training


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Writes the synthetic dataset under `workdir/data` (once) and trains/evaluates on it.

    Both roots point at the same synthetic set unless the config names others: the demo shows
    the machinery working, not zero-shot transfer. A method with nothing to train (WinCLIP) is
    only evaluated.
    """
    data_root = pathlib.Path(workdir) / "data"
    if not (data_root / "meta.json").exists():
        synthetic.write_synthetic_dataset(data_root, image_size=config.model.image_size)
    config = config.copy_and_resolve_references()
    config.data.train_root = config.data.train_root or str(data_root)
    config.data.test_root = config.data.test_root or str(data_root)
    if not needs_training(config.method):
        return evaluate.evaluate(config, workdir)
    return train_eval.train_and_evaluate(config, workdir)
