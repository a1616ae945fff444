"""Shared set-up of the train/eval benchmarks: a random backbone of a published CLIP shape in the
run config, and the synthetic set written at the input size under /tmp (once)."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import ml_collections

from genclip_jax import defaults
from genclip_jax.clip.model import ARCHITECTURES, CLIPConfig
from genclip_jax.data import synthetic

_SWITCHES = {"dpam_start", "global_mode", "compute_dtype"}  # set by config.model, not the arch


def add_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--arch", default="ViT-L/14@336px", choices=sorted(ARCHITECTURES))
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--images", type=int, default=16, help="size of the synthetic set")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """The default (paper) config with a random `args.arch` backbone and the synthetic set."""
    c = defaults.base_config()
    arch: CLIPConfig = ARCHITECTURES[args.arch]
    c.model.clip = "random"
    c.model.random_arch = ml_collections.ConfigDict(
        {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)
         if f.name not in _SWITCHES}
    )
    c.model.image_size = args.image_size
    c.anomalyclip.features_list = [arch.vision_layers]  # the paper's last-layer taps
    c.model.compute_dtype = args.dtype
    c.data.train_root = c.data.test_root = str(synthetic_root(args.image_size, args.images))
    c.train.batch_size = c.eval.batch_size = args.batch_size
    c.train.progress = False
    return c


def synthetic_root(image_size: int, images: int) -> pathlib.Path:
    """One class ('disc'), half good and half 'spot' defects, `images` in all."""
    root = pathlib.Path(f"/tmp/genclip_bench_{image_size}px_{images}")
    if not (root / "meta.json").is_file():
        synthetic.write_synthetic_dataset(
            root, image_size=image_size, classes=("disc",), defects=("spot",), n_train_good=0,
            n_test_good=images - images // 2, n_test_defect_per_type=images // 2,
        )
    return root
