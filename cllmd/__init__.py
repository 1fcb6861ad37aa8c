"""cllmd (the directory cllmd/): a local, self-training language-model daemon, and the library
it is made of (`python -m cllmd` runs the `cllmd` command).

Its kernels are the package cllmd.kernels, which lives in the directory kernels/; the client
package cllm lives in client/ (see the README's table).
"""

__version__ = "0.1.0"
