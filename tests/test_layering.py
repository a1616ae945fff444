"""Module layering: `train` and `evaluate` never import each other (`train_eval` sits above)."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / "genclip_jax"


def _imports(module: str) -> set[str]:
    """The genclip_jax modules `module` imports, as dotted names."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{a.name}" for a in node.names)
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize(("module", "other"), [("train", "evaluate"), ("evaluate", "train")])
def test_train_and_evaluate_do_not_import_each_other(module, other):
    assert f"genclip_jax.{other}" not in _imports(module)


def test_train_eval_sits_above_both():
    assert {"genclip_jax.train", "genclip_jax.evaluate"} <= _imports("train_eval")
