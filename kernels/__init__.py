"""cllmd.kernels (the directory kernels/): numba kernels for the CLLM, each beside its numpy
reference version.

Importing this package points numba's on-disk cache at cllmd's cache directory
($NUMBA_CACHE_DIR, else $CACHE_DIRECTORY/numba under systemd, else $XDG_CACHE_HOME/cllmd/numba),
in a subdirectory named by a digest of the kernel sources, so compiled kernels survive
restarts and are shared by the daemon, the tools and the tests.
"""
import hashlib
import os
import sys
from pathlib import Path

from cllm import layout


def _sources_digest() -> str:
    # numba revalidates a cached kernel against its own file only, not the files of the
    # kernels it calls (the model pass calls nearly all of them): a cache directory per
    # version of the kernel sources keeps an edited or upgraded kernel from running stale code.
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def _numba_cache_dir() -> str:
    base = os.environ.get("NUMBA_CACHE_DIR") or str(layout.cache_dir() / "numba")
    digest = _sources_digest()
    # a child process inherits the digested path: do not nest another level
    return base if os.path.basename(os.path.normpath(base)) == digest else os.path.join(base, digest)


os.environ["NUMBA_CACHE_DIR"] = _numba_cache_dir()
if "numba" in sys.modules:  # imported earlier: numba read its configuration already
    sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]
