"""Numba kernels for the CLLM, each beside its numpy reference version.

Importing this package points numba's on-disk cache at cllmd's cache directory
($NUMBA_CACHE_DIR, else $CACHE_DIRECTORY under systemd, else $XDG_CACHE_HOME/cllmd),
so compiled kernels survive restarts and are shared by the daemon, the tools and the tests.
"""
import os


def _numba_cache_dir() -> str:
    base = os.environ.get("CACHE_DIRECTORY")  # systemd's CacheDirectory=
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "cllmd")
    return os.path.join(base, "numba")


os.environ.setdefault("NUMBA_CACHE_DIR", _numba_cache_dir())
