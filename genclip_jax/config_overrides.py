"""Configs from files and text: `configs/X.py:arg`, list/tuple fields, dotted overrides.

ml_collections cannot override list fields at all and reads `--config.F='(a,b)'` on a tuple field
as the one-string tuple `('(a,b)',)`; the CLI routes those overrides to `parse_sequence` instead.
"""

from __future__ import annotations

import ast
import copy
import difflib
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections import config_flags

_BRACKETS = {"(": ")", "[": "]"}
_BOOLS = {"true": True, "t": True, "yes": True, "1": True,
          "false": False, "f": False, "no": False, "0": False}
_KIND_NAMES = {int: "integers", float: "numbers", bool: "booleans (true/false)", str: "strings"}


def _element_type(default: Sequence, field: str) -> type:
    """The type of the default's elements (str for an empty default: class names are strings)."""
    kinds = {type(v) for v in default}
    if not kinds:
        return str
    if kinds == {int, float}:
        return float
    if len(kinds) == 1 and kinds <= _KIND_NAMES.keys():
        return next(iter(kinds))
    raise ValueError(
        f"{field}: only sequences of {sorted(k.__name__ for k in _KIND_NAMES)} can be set from "
        f"the command line, the default {default!r} holds {sorted(k.__name__ for k in kinds)}"
    )


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _coerce(text: str, kind: type, field: str):
    try:
        return _BOOLS[text.lower()] if kind is bool else kind(_unquote(text))
    except (KeyError, ValueError):
        raise ValueError(f"{field}: expected {_KIND_NAMES[kind]}, got {text!r}") from None


def parse_sequence(text: str, default: Sequence, field: str) -> list | tuple:
    """Parses the command-line `text` of a sequence field whose default value is `default`.

    `text` is comma-separated, optionally in () or [], elements optionally quoted; an empty `text`
    is an empty sequence. Elements take the type of `default`'s elements and the result its
    container type (list or tuple). `field` names the override in errors (`--config.a.b`).
    """
    body = text.strip()
    if body[:1] in _BRACKETS:
        if body[-1:] != _BRACKETS[body[0]]:
            raise ValueError(
                f"{field}: expected a closing {_BRACKETS[body[0]]!r} after {body[0]!r}, "
                f"got {text!r}"
            )
        body = body[1:-1].strip()
    items = [item.strip() for item in body.split(",")] if body else []
    if len(items) > 1 and not items[-1]:  # `(6,)`: Python's one-element tuple
        items.pop()
    if "" in items:
        raise ValueError(f"{field}: expected comma-separated values, got an empty one in {text!r}")
    kind = _element_type(default, field)
    values = [_coerce(item, kind, field) for item in items]
    return tuple(values) if isinstance(default, tuple) else values


def check_config_arg(config_file: str, arg: str, allowed: Sequence[str]) -> None:
    """Rejects an unknown `configs/X.py:arg` while the flags are parsed, not deep into a run."""
    if arg in allowed:
        return
    close = difflib.get_close_matches(arg, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"{config_file}: arg must be one of {list(allowed)}, got {arg!r}{hint}")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """The config of `configs/X.py[:arg]` (its `get_config(arg)`), loaded as `--config` is.

    Raises FileNotFoundError naming a missing file, ValueError with the file's own message for a
    bad arg.
    """
    path = spec.split(":", 1)[0]
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found (e.g. configs/anomalyclip.py:visa)")
    try:
        return config_flags.config_flags.ConfigFileFlagParser("config").parse(spec)
    except (TypeError, ValueError) as err:  # re-raised with the traceback as text; cause inside
        raise ValueError(str(err.__context__ or err)) from None


def parse_value(text: str) -> Any:
    """A Python literal (numbers, lists, True/False/None, quoted strings), else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted-path overrides; values given as text are parsed (kept as
    text for string fields). Unknown fields or wrong types raise ValueError naming the field."""
    config = copy.deepcopy(config)
    for field, value in overrides.items():
        *parents, leaf = field.split(".")
        node = config
        for depth, key in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                raise ValueError(f"unknown config field {field!r}: "
                                 f"{'.'.join(parents[: depth + 1])!r} does not exist")
            node = node[key]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"unknown config field {field!r}")
        current = node[leaf]
        if isinstance(value, str) and not isinstance(current, str):
            value = parse_value(value)
        try:
            node[leaf] = value
        except TypeError as err:
            raise ValueError(f"config field {field!r}: expected a value of type "
                             f"{type(current).__name__}, got {value!r} ({err})") from None
    return config
