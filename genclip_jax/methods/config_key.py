"""Methods that compare equal when built from the same config, so that a jitted step taking the
method as a static argument compiles once per (method, config), not once per instance."""

from __future__ import annotations

from collections.abc import Hashable


class ConfigKeyed:
    """Equal to (and hashing as) any instance of its class with the same `config_key`: the
    hashable config parts its computations read, set by `__init__`."""

    config_key: Hashable

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.config_key == self.config_key

    def __hash__(self) -> int:
        return hash((type(self), self.config_key))
