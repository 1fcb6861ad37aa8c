"""How this process was started: alone, or as one rank of an MPI job (mpirun/mpiexec).

Read from the launcher's environment only, so plain runs never import mpi4py; the trainer
class follows from it (cllmd.distributed under MPI, cllmd.trainer otherwise).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    rank: int
    size: int


# (rank, size) variables of the launchers: OpenMPI, MPICH/Hydra and other PMI launchers
_ENV = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"))


def launched() -> Launch | None:
    """This process's rank and the job's size when an MPI launcher started it, else None."""
    for rank_key, size_key in _ENV:
        if rank_key in os.environ and size_key in os.environ:
            try:
                return Launch(int(os.environ[rank_key]), int(os.environ[size_key]))
            except ValueError:
                return None
    return None


def trainer_class():
    """DistributedTrainer once cllmd.distributed.start() has run (under mpirun), else Trainer."""
    dist = sys.modules.get("cllmd.distributed")
    if dist is not None and dist.started():
        return dist.DistributedTrainer
    from cllmd.trainer import Trainer
    return Trainer
