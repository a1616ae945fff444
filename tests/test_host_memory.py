"""Freed heap pages go back to the system: what keeps evaluation's peak at its largest class."""

from __future__ import annotations

import json
import subprocess
import sys

from genclip_jax import host_memory

# In a fresh process: 200 MB of 1 MB heap blocks (a freed 16 MB block first raises glibc's mmap
# threshold, so they come from the heap, as the batch arrays of an evaluation do) are freed
# below one block still alive, which keeps the heap top from shrinking by itself.
_SCRIPT = """
import json, os
import numpy as np
from genclip_jax import host_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

np.ones(16 << 20, np.uint8)  # allocated and freed at once
blocks = [np.ones(1 << 20, np.uint8) for _ in range(201)]
last = blocks.pop()
del blocks
before = rss()
released = host_memory.release_free_memory()
print(json.dumps({"released": released, "freed": before - rss()}))
"""


def test_freed_heap_pages_are_returned_to_the_system():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout)
    assert result["released"] is True  # glibc (Linux): the CI machine's C library
    assert result["freed"] > 150 << 20, result


def test_a_second_release_is_harmless():
    assert host_memory.release_free_memory() == host_memory.release_free_memory()
