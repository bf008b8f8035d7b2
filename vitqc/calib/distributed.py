"""More than one GPU: under ``torchrun`` (or any initialised ``torch.distributed`` group) generation and
prompt learning shard the classes across ranks: rank r takes the classes c with ``c % world == r``.

Every helper degrades to the single-process case when no process group is initialised, so the sources
and the cache writer call them unconditionally. :func:`init_from_env` starts the group from torchrun's
environment (NCCL on GPUs, gloo on the CPU) and picks ``cuda:LOCAL_RANK``.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.distributed as td


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    if is_initialized():
        return td.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if is_initialized():
        return td.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment when WORLD_SIZE > 1 and none is
    initialised yet; returns whether a group is (now) initialised."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not td.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    td.init_process_group(backend=backend)
    return True


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when GPUs are present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def shard_classes(classes: Sequence[int], rank_: int | None = None, world: int | None = None) -> list[int]:
    """This rank's share: the classes c with ``c % world == rank``."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return [c for c in classes if c % w == r]


def barrier() -> None:
    if is_initialized():
        if td.get_backend() == "nccl":
            td.barrier(device_ids=[torch.cuda.current_device()])
        else:
            td.barrier()


def gather_dict(local: dict[Any, Any]) -> dict[Any, Any] | None:
    """Merge every rank's dict on rank 0 (other ranks get None); tensors travel on the CPU."""
    if not is_initialized():
        return dict(local)
    payload = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in local.items()}
    out: list[Any] | None = [None] * td.get_world_size() if td.get_rank() == 0 else None
    td.gather_object(payload, out, dst=0)
    if out is None:
        return None
    merged: dict[Any, Any] = {}
    for part in out:
        merged.update(part or {})
    return merged


def all_sum(value: int) -> int:
    """Sum an integer over ranks (the value itself without a group)."""
    if not is_initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long)
    if td.get_backend() == "nccl":
        t = t.cuda()
    td.all_reduce(t)
    return int(t.item())
