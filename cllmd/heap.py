"""Large heap blocks go back to the system when freed.

glibc's malloc serves blocks from M_MMAP_THRESHOLD up with their own mmap, unmapped on free,
but it raises that threshold each time such a block is freed (up to 32 MiB). After one large
request, the next ones' buffers (a 16 MiB text, its ids, its reply) come from the heap instead,
and freed heap memory stays in the process: a 15 MiB tokenize left ~77 MiB of RSS behind it
(issue 11, F1), and the next large request's peak came on top. Setting the threshold fixes it
at MMAP_THRESHOLD_BYTES. The cost is a fresh mapping (page faults) per block that large: the
trainer's step measured the same with and without it (docs/benchmarks.md, "Reliability").
"""
from __future__ import annotations

import ctypes

MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3   # glibc's malloc.h

try:
    _mallopt = ctypes.CDLL(None).mallopt   # glibc; other C libraries (musl, macOS) lack it
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
except (AttributeError, OSError):
    _mallopt = None


def return_large_blocks() -> bool:
    """Fix malloc's mmap threshold for this process; False where the C library cannot."""
    return _mallopt is not None and _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
