"""cllmd: a local, self-training language-model daemon."""

__version__ = "0.1.0"
