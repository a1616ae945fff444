"""Discovery and loading of the golden fixtures of the official PyTorch AnomalyCLIP code.

A fixture is a main ``.npz`` with a same-stem ``.json`` sidecar; the sidecar's
``files.supplementary`` (optional) names extra ``.npz`` files, relative to the main file's folder,
whose arrays belong to the same fixture (split off for size).

The environment variable ``GENCLIP_FIXTURES`` selects the main ``.npz`` files (paths separated by
``:``); without it, every ``tests/data/anomalyclip_*.npz`` that has a sidecar is used. WinCLIP's
fixtures (anomalib's code) come the same way from ``GENCLIP_WINCLIP_FIXTURES`` /
``tests/data/winclip_*.npz``.

Usage in a test module::

    from fixtures import fixture_paths, load_fixture, load_sidecar, parametrize_fixtures

    @parametrize_fixtures
    def test_something(fixture_path):
        ref = load_fixture(fixture_path)      # dict: key -> np.ndarray (main + supplementary)
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import numpy as np
import pytest

DATA_DIR = pathlib.Path(__file__).parent / "data"
ENV_VAR = "GENCLIP_FIXTURES"


def sidecar_path(npz_path: str | os.PathLike) -> pathlib.Path:
    """The ``.json`` sidecar of a main fixture ``.npz`` (same folder, same stem)."""
    return pathlib.Path(npz_path).with_suffix(".json")


def fixture_paths(
    env_var: str = ENV_VAR, pattern: str = "anomalyclip_*.npz"
) -> list[pathlib.Path]:
    """Main fixture ``.npz`` paths: from ``$env_var`` or the `pattern` files in tests/data."""
    spec = os.environ.get(env_var, "").strip()
    if spec:
        paths = [pathlib.Path(p).expanduser() for p in spec.split(":") if p.strip()]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{env_var}: fixture file {p} does not exist")
            if not sidecar_path(p).is_file():
                raise FileNotFoundError(
                    f"{env_var}: fixture {p} has no sidecar {sidecar_path(p)} (expected a .json "
                    "with the same stem)"
                )
        return paths
    return sorted(p for p in DATA_DIR.glob(pattern) if sidecar_path(p).is_file())


@functools.lru_cache(maxsize=4)
def load_sidecar(npz_path: str | os.PathLike) -> dict:
    """The parsed ``.json`` sidecar of a main fixture (config, notes, facts, keys, files)."""
    path = sidecar_path(npz_path)
    if not path.is_file():
        raise FileNotFoundError(f"fixture sidecar {path} not found (needed for {npz_path})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def supplementary_paths(npz_path: str | os.PathLike) -> list[pathlib.Path]:
    """The supplementary ``.npz`` files named by the sidecar's ``files.supplementary``."""
    entry = load_sidecar(npz_path).get("files", {}).get("supplementary") or []
    names = [entry] if isinstance(entry, str) else list(entry)
    folder = pathlib.Path(npz_path).parent
    return [folder / name for name in names]


@functools.lru_cache(maxsize=2)
def _load(npz_path: pathlib.Path) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for path in [npz_path, *supplementary_paths(npz_path)]:
        if not path.is_file():
            raise FileNotFoundError(
                f"fixture file {path} not found (main fixture {npz_path}; supplementary files "
                f"come from files.supplementary of {sidecar_path(npz_path)})"
            )
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                if key in arrays:
                    raise ValueError(f"fixture {path}: key {key!r} already defined by {npz_path}")
                arrays[key] = data[key]
    return arrays


def load_fixture(npz_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of a fixture (main file + supplementary files) in one dict (cached; a copy)."""
    return dict(_load(pathlib.Path(npz_path).resolve()))


def fixture_id(npz_path: str | os.PathLike) -> str:
    return pathlib.Path(npz_path).stem


_PATHS = fixture_paths()
parametrize_fixtures = pytest.mark.parametrize(
    "fixture_path", _PATHS, ids=[fixture_id(p) for p in _PATHS]
)
"""Decorator: runs a test once per fixture with the argument ``fixture_path``."""
