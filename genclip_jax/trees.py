"""The difference of two flat `{leaf name: shape}` maps: what a checkpoint lacks, adds or shapes
otherwise than what loads it expects (CLIP weights, prompt checkpoints)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class ShapeDifferences:
    """Sorted leaf names: `missing` from what was read, `unexpected` in it, and `wrong`:
    (name, shape read, shape expected)."""

    missing: list[str]
    unexpected: list[str]
    wrong: list[tuple[str, tuple[int, ...], tuple[int, ...]]]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong)


def shape_differences(
    got: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> ShapeDifferences:
    """Compares the shapes read (`got`) with those expected, leaf by leaf."""
    return ShapeDifferences(
        missing=sorted(expected.keys() - got.keys()),
        unexpected=sorted(got.keys() - expected.keys()),
        wrong=[(k, tuple(got[k]), tuple(expected[k])) for k in sorted(got.keys() & expected.keys())
               if tuple(got[k]) != tuple(expected[k])],
    )
