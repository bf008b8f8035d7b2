"""More than one GPU: under ``torchrun`` (or any initialised ``torch.distributed`` group) generation and
prompt learning shard the classes across ranks: rank r takes the classes c with ``c % world == r``.

The process-group helpers (rank, world size, torchrun's environment, barriers, gathers) are
:mod:`vitqc.distributed`'s, re-exported here for the calibration sources and the cache writer; every one
degrades to the single-process case when no group is initialised.
"""
from __future__ import annotations

from typing import Sequence

from vitqc.distributed import (all_sum, barrier, gather_dict, init_from_env, is_initialized, is_main,  # noqa: F401
                               local_device, rank, world_size)


def shard_classes(classes: Sequence[int], rank_: int | None = None, world: int | None = None) -> list[int]:
    """This rank's share: the classes c with ``c % world == rank``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return [c for c in classes if c % w == r]
