"""cllm (the directory client/): the thin client of cllmd, with the `cllm` and `cllm-status`
commands (`python -m cllm` runs `cllm`). Only pyzmq, msgpack and the standard library.

cllm.layout and cllm.durable are shared with the daemon: where the files live, how a file
enters the queue, and how a file is written durably.
"""

__version__ = "0.1.0"
