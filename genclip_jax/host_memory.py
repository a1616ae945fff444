"""Host memory handed back to the operating system between the phases of a long job.

Evaluation fills one class's buffers, computes its metrics and frees them before the next class
fills. glibc keeps the freed heap pages (and the many batch-sized arrays freed in between) in
its arenas, scattered among live allocations, so without a trim the peak RSS is the largest
class plus that fragmentation (about 100 MB at 518 px, measured by benchmarks/eval_memory.py).
`malloc_trim(0)` returns every whole free page to the system; it costs milliseconds per call.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Returns the allocator's free pages to the system; False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
