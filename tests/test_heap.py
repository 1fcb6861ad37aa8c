"""Large blocks go back to the system when freed (cllmd/heap.py), in a real process."""
import subprocess
import sys
import textwrap

import pytest

from cllmd.heap import MMAP_THRESHOLD_BYTES, return_large_blocks

# Allocates and frees a 24 MiB block twice, touching every page, and prints the RSS (MiB) the
# second block left behind. glibc raises its mmap threshold when the first block is freed, so
# by default the second comes from the heap and stays resident after free.
PROBE = textwrap.dedent("""
    import ctypes, sys
    from cllmd.heap import return_large_blocks
    if sys.argv[1] == "fixed":
        assert return_large_blocks()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    guard = []
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    size = 24 << 20
    for round in range(2):
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        guard.append(libc.malloc(4096))   # a small block above it: the heap's top cannot shrink past
        before = rss()
        libc.free(p)
    print(round, before - rss())
""")


def _released_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not return_large_blocks(),
                    reason="glibc's mallopt and /proc are Linux's")
def test_heap_a_freed_large_block_leaves_no_rss_behind():
    assert MMAP_THRESHOLD_BYTES <= 1 << 20
    assert _released_mib("fixed") >= 20          # the whole 24 MiB went back at free
    assert _released_mib("default") < 4          # what glibc does by default: it stays
