"""Shared set-up of the end-to-end tests: a one-class synthetic set, a tiny config, and a
persistent XLA compilation cache.

The cache matters: every `train`/`evaluate` call builds its jitted functions anew, and compiling
the tiny backbone's initialisation alone takes ~20 s on 2 cores. With the cache (also handed to
CLI subprocesses through `CACHE_ENV`) only the first compile of each program pays.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import jax
import ml_collections
import numpy as np

from genclip_jax import defaults
from genclip_jax.data import synthetic
from genclip_jax.metric_writers import MetricWriter

IMAGE_SIZE = 112
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": str(pathlib.Path(tempfile.gettempdir()) / "genclip_jax_xla_cache"),
    # Every program, however quick to compile: a CLI subprocess compiles dozens of small ones
    # (measured: a warm `genclip-jax demo` takes 19.2 s with all cached, 21.0 s above 0.5 s).
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
}
jax.config.update("jax_compilation_cache_dir", CACHE_ENV["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def subprocess_env() -> dict[str, str]:
    """This process's environment (8 CPU devices, offline) plus the compilation cache."""
    return {**os.environ, **CACHE_ENV}


def write_dataset(root: pathlib.Path) -> pathlib.Path:
    """12 images of one class (4 good, 8 defective) at 112 px: 2 steps of 8 (the last padded)."""
    synthetic.write_synthetic_dataset(
        root, image_size=IMAGE_SIZE, classes=("disc",), n_train_good=0, n_test_good=4,
        n_test_defect_per_type=2,
    )
    return root


def tiny_config(data_root: pathlib.Path) -> ml_collections.ConfigDict:
    config = defaults.tiny_config()
    config.data.train_root = str(data_root)
    config.data.test_root = str(data_root)
    config.train.progress = False
    return config


def cli_overrides(data_root: pathlib.Path) -> list[str]:
    """The command-line flags that give `tiny_config(data_root)`."""
    return [
        "--config=configs/tiny.py",
        f"--config.data.train_root={data_root}",
        f"--config.data.test_root={data_root}",
        "--config.train.progress=False",
    ]


class RecordingWriter(MetricWriter):
    """Keeps every scalar written: `scalars[name]` is a list of (step, value)."""

    def __init__(self) -> None:
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def write_scalars(self, step, scalars) -> None:
        for name, value in scalars.items():
            self.scalars.setdefault(name, []).append((int(step), float(value)))

    def write_images(self, step, images) -> None:
        del step, images

    def write_texts(self, step, texts) -> None:
        del step, texts

    def write_hparams(self, hparams) -> None:
        del hparams


def host_tree(tree) -> list[np.ndarray]:
    """Leaves of a (device) pytree as numpy arrays, for exact comparisons."""
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_trees_equal(a, b) -> None:
    leaves_a, leaves_b = host_tree(a), host_tree(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)
