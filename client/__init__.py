"""cllm: the thin client of cllmd (pyzmq, msgpack and the standard library only)."""

__version__ = "0.1.0"
