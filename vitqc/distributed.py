"""More than one device or machine: torch.distributed under ``torchrun``, one process per device.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; :func:`init_from_env` starts the default process group from them
(NCCL for CUDA devices, gloo for the CPU) with a timeout (``VITQC_DIST_TIMEOUT_S``, default 900 s), so a rank that
dies outside a collective cannot hang the others forever, and :func:`resolve_device` gives each process
``cuda:LOCAL_RANK``. Every helper degrades to the single-process case when no group is initialised, so callers use
them unconditionally. Only rank 0 prints and writes (:func:`is_main`).

What joint optimization needs on top (:mod:`vitqc.passes.joint_optimize`): :class:`GradientReducer` sums
gradients over ranks in a few flat buckets, :func:`broadcast_` makes tensors equal to rank 0's in place, and
:func:`broadcast_tree` sends a nested structure of tensors (a checkpoint) from rank 0. Class sharding of
calibration generation lives in :mod:`vitqc.calib.distributed`.
"""
from __future__ import annotations

import atexit
import datetime
import os
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as td

from vitqc.errors import VitqcError

TIMEOUT_ENV = "VITQC_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900.0
BUCKET_BYTES = 64 * 2**20  # flat all-reduce / broadcast buckets: few collectives, bounded transient memory


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


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0 (also before the group is initialised, from torchrun's RANK): the one that prints and writes."""
    return rank() == 0


def rank_prefix() -> str:
    """``"rank 1: "`` in a group of more than one process, else empty (for error lines)."""
    return f"rank {rank()}: " if world_size() > 1 else ""


def timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise VitqcError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds (e.g. {TIMEOUT_ENV}=1800)") from None
    if seconds <= 0:
        raise VitqcError(f"{TIMEOUT_ENV} must be a positive number of seconds, not {raw}")
    return datetime.timedelta(seconds=seconds)


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment when WORLD_SIZE > 1 and none is
    initialised yet (NCCL when CUDA is available and ``backend`` is not given, else gloo); returns whether a group
    is (now) initialised. The group is destroyed at interpreter exit."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not td.is_available():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    td.init_process_group(backend=backend, timeout=timeout())
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if is_initialized():
        td.destroy_process_group()


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when GPUs are present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(requested: str | torch.device | None) -> torch.device:
    """The device this process computes on: ``None``/``"auto"`` -> CUDA when available, else the CPU; under
    torchrun (WORLD_SIZE > 1) a plain ``"cuda"`` is this process's own GPU, ``cuda:LOCAL_RANK``."""
    if requested is None or str(requested) == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return local_device()
    return device


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _collective_device() -> torch.device:
    """Where tensors must be for the default group's collectives (NCCL: this process's GPU)."""
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


def all_gather_objects(local: Any) -> list[Any]:
    """Every rank's ``local`` (picklable; tensors should be on the CPU), in rank order, on every rank. Without a
    group: ``[local]``."""
    if not is_initialized():
        return [local]
    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, local)
    return out


def all_sum(value: int) -> int:
    """Sum an integer over ranks (the value itself without a group)."""
    if not is_initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=_collective_device())
    td.all_reduce(t)
    return int(t.item())


# ------------------------------------------------------------------------------------------- tensors
def _buckets(tensors: Sequence[torch.Tensor], limit: int = BUCKET_BYTES) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype) in order, each group cut into runs of at most ``limit``
    bytes (a larger tensor is a bucket of its own)."""
    groups: dict[tuple, list[list[int]]] = {}
    sizes: dict[tuple, int] = {}
    for i, t in enumerate(tensors):
        key = (t.device, t.dtype)
        runs = groups.setdefault(key, [[]])
        nbytes = t.numel() * t.element_size()
        if runs[-1] and sizes[key] + nbytes > limit:
            runs.append([])
            sizes[key] = 0
        runs[-1].append(i)
        sizes[key] = sizes.get(key, 0) + nbytes
    return [run for runs in groups.values() for run in runs if run]


@torch.no_grad()
def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Make ``tensors`` (the same shapes and dtypes on every rank) equal to rank ``src``'s, in place, a few flat
    bucketed broadcasts instead of one per tensor. Without a group: nothing to do."""
    tensors = list(tensors)
    if not is_initialized() or not tensors:
        return
    via = _collective_device()
    for bucket in _buckets(tensors):
        parts = [tensors[i] for i in bucket]
        flat = torch.cat([t.detach().reshape(-1).to(via) for t in parts])
        td.broadcast(flat, src=src)
        for t, piece in zip(parts, flat.split([p.numel() for p in parts])):
            t.copy_(piece.view_as(t))


class _TensorSlot:
    """Stands for a tensor in the structure :func:`broadcast_tree` pickles: its shape and dtype."""

    def __init__(self, index: int, t: torch.Tensor) -> None:
        self.index, self.shape, self.dtype = index, tuple(t.shape), t.dtype


def broadcast_tree(tree: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``tree`` (dicts, lists, tuples, tensors, plain values) on every rank, tensors on the CPU:
    the structure travels pickled without its tensors, the tensors in flat bucketed broadcasts. The other ranks'
    ``tree`` argument is ignored. Without a group: ``tree`` itself."""
    if not is_initialized():
        return tree
    tensors: list[torch.Tensor] = []

    def strip(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            tensors.append(x.detach())
            return _TensorSlot(len(tensors) - 1, x)
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(strip(v) for v in x)
        return x

    box = [strip(tree) if td.get_rank() == src else None]
    td.broadcast_object_list(box, src=src)
    skeleton = box[0]
    slots: list[_TensorSlot] = []

    def collect(x: Any) -> None:
        if isinstance(x, _TensorSlot):
            slots.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    collect(skeleton)
    slots.sort(key=lambda s: s.index)
    via = _collective_device()
    if td.get_rank() == src:
        moved = [t.to(via) for t in tensors]
    else:
        moved = [torch.empty(s.shape, dtype=s.dtype, device=via) for s in slots]
    broadcast_(moved, src=src)
    received = [t.cpu() for t in moved]

    def fill(x: Any) -> Any:
        if isinstance(x, _TensorSlot):
            return received[x.index]
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(fill(v) for v in x)
        return x

    return fill(skeleton)


class GradientReducer:
    """Sums the gradients of ``params`` over all ranks, a few large all-reduces per step instead of one per
    tensor (joint optimization has ~240 small and large trainable tensors).

    As DDP's ``gradient_as_bucket_view``: :meth:`bind` (before backward) points every ``param.grad`` at a zeroed
    slice of a flat per-(device, dtype) bucket, so backward accumulates straight into the buckets and reducing
    them needs no copies. :meth:`all_reduce` sums the buckets and a small float vector of the caller's (logged
    values, a failure flag) in the same round.
    """

    def __init__(self, params: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
        self.params = list(params)
        self.buckets: list[torch.Tensor] = []
        self.views: list[torch.Tensor] = [torch.empty(0)] * len(self.params)
        for bucket in _buckets(self.params, bucket_bytes):
            parts = [self.params[i] for i in bucket]
            flat = torch.zeros(sum(p.numel() for p in parts), dtype=parts[0].dtype, device=parts[0].device)
            self.buckets.append(flat)
            for i, piece in zip(bucket, flat.split([p.numel() for p in parts])):
                self.views[i] = piece.view_as(self.params[i])

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buckets)

    def bind(self) -> None:
        """Zero the buckets and make each parameter's ``.grad`` its slice of them (instead of zero_grad)."""
        for flat in self.buckets:
            flat.zero_()
        for p, view in zip(self.params, self.views):
            p.grad = view

    @torch.no_grad()
    def all_reduce(self, extra: torch.Tensor) -> torch.Tensor:
        """Sum the gradients and ``extra`` (a float vector on the parameters' device) over ranks; returns the summed
        ``extra``. Every rank must call it once per step, in step."""
        for p, view in zip(self.params, self.views):
            if p.grad is not view:  # autograd replaced the bound gradient instead of accumulating into it
                view.copy_(p.grad if p.grad is not None else torch.zeros_like(view))
                p.grad = view
        if not is_initialized():
            return extra
        works = [td.all_reduce(flat, async_op=True) for flat in self.buckets]
        works.append(td.all_reduce(extra, async_op=True))
        for work in works:
            work.wait()
        return extra
