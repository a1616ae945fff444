"""The public API (`genclip_jax.__all__`) is pinned: every name with its signature, the members
of its classes and the functions of its modules, in tests/data/public_api.json.

A name that disappears or changes needs a new `genclip_jax.__version__`; then

    python tests/test_public_api.py

rewrites the snapshot (it refuses to while the version is the one recorded). New names may be
added without a new version.
"""

from __future__ import annotations

import inspect
import json
import pathlib
import re
import sys

import flax.linen as nn

import genclip_jax

SNAPSHOT = pathlib.Path(__file__).parent / "data" / "public_api.json"


def _signature(obj) -> str:
    try:
        return re.sub(r" at 0x[0-9a-f]+", "", str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return type(obj).__name__


def _describe(obj) -> str | dict:
    if inspect.ismodule(obj):
        names = getattr(obj, "__all__", None) or [
            n for n, v in vars(obj).items()
            if not n.startswith("_") and getattr(v, "__module__", None) == obj.__name__
        ]
        return {n: _describe(getattr(obj, n)) for n in sorted(names)}
    if inspect.isclass(obj):
        # A Flax module's constructor is its fields (Flax adds `parent` and `name`).
        flax_fields = ("parent", "name") if issubclass(obj, nn.Module) else ()
        init = (f"fields: {[f for f in obj.__annotations__ if f not in flax_fields]}"
                if flax_fields else _signature(obj))
        members = {"__init__": init}
        for name, member in vars(obj).items():
            if name.startswith("_"):
                continue
            if isinstance(member, property):
                members[name] = "property"
            elif callable(member):
                members[name] = _signature(member)
        for name, kind in getattr(obj, "__annotations__", {}).items():
            if name not in flax_fields:
                members.setdefault(name, f"attribute: {kind}")
        return members
    return _signature(obj) if callable(obj) else repr(obj)


def public_api() -> dict:
    return {name: _describe(getattr(genclip_jax, name))
            for name in genclip_jax.__all__ if name != "__version__"}


def _changes(old: dict, new: dict, prefix: str = "") -> tuple[list[str], list[str]]:
    """(removed or changed, added) dotted names."""
    broken, added = [], []
    for name in sorted(old.keys() | new.keys()):
        where = f"{prefix}{name}"
        if name not in new:
            broken.append(f"{where} (removed)")
        elif name not in old:
            added.append(where)
        elif isinstance(old[name], dict) and isinstance(new[name], dict):
            more_broken, more_added = _changes(old[name], new[name], where + ".")
            broken += more_broken
            added += more_added
        elif old[name] != new[name]:
            broken.append(f"{where}: {old[name]} -> {new[name]}")
    return broken, added


def test_public_names_and_signatures_are_pinned():
    snapshot = json.loads(SNAPSHOT.read_text())
    broken, _ = _changes(snapshot["api"], public_api())
    assert not broken, (
        f"the public API changed under version {genclip_jax.__version__}:\n  "
        + "\n  ".join(broken)
        + "\nBump genclip_jax.__version__, then run `python tests/test_public_api.py`."
    )


def test_a_removed_or_changed_name_is_caught_and_an_added_one_is_not():
    old = public_api()
    new = {**old, "maps": {**old["maps"], "gaussian_blur": "(maps)"}, "added": "()"}
    del new["load"]
    broken, added = _changes(old, new)
    assert broken == ["load (removed)",
                      f"maps.gaussian_blur: {old['maps']['gaussian_blur']} -> (maps)"]
    assert added == ["added"]


def test_every_public_name_resolves_and_nothing_else_is_exported():
    for name in genclip_jax.__all__:
        assert getattr(genclip_jax, name) is not None
    assert sorted(dir(genclip_jax)) == sorted(genclip_jax.__all__)
    try:
        genclip_jax.Checkpointer  # noqa: B018 - internal names stay internal
    except AttributeError as err:
        assert "no attribute 'Checkpointer'" in str(err)
    else:
        raise AssertionError("an internal name is reachable from genclip_jax")


if __name__ == "__main__":
    current = public_api()
    if SNAPSHOT.exists():
        stored = json.loads(SNAPSHOT.read_text())
        broken, _ = _changes(stored["api"], current)
        if broken and stored["version"] == genclip_jax.__version__:
            sys.exit("removed or changed names need a new genclip_jax.__version__ first:\n  "
                     + "\n  ".join(broken))
    text = json.dumps({"version": genclip_jax.__version__, "api": current}, indent=1)
    SNAPSHOT.write_text(text + "\n")
    print(f"wrote {SNAPSHOT}")
