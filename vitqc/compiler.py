"""``vitqc.compile``: capture a model, run a pipeline over it, and return the quantized graph."""
from __future__ import annotations

import copy
import random
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx, nn

from vitqc import distributed
from vitqc.errors import VitqcError
from vitqc.passes.base import CompileContext
from vitqc.passes.manager import PassManager
from vitqc.pipeline import Pipeline, load_pipeline

__all__ = ["compile", "seed_everything", "as_batches"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def as_batches(calib: torch.Tensor | Sequence[torch.Tensor] | None, batch_size: int = 32) -> list[torch.Tensor]:
    if calib is None:
        return []
    if isinstance(calib, torch.Tensor):
        return list(calib.split(batch_size))
    return [b for b in calib]


def _override_strings(overrides: dict[str, Any]) -> list[str]:
    """``calibrate__method="mse"`` or ``**{"calibrate.method": "mse"}`` -> ``["calibrate.method=mse"]``."""
    out = []
    for key, value in overrides.items():
        dotted = key if "." in key else key.replace("__", ".", 1)
        if "." not in dotted:
            raise VitqcError(f"override {key!r}: name it PASS__OPTION (or 'PASS.OPTION'), e.g. calibrate__method")
        text = value if isinstance(value, str) else _toml_literal(value)
        out.append(f"{dotted}={text}")
    return out


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_literal(v)}' for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    return repr(value)


def compile(model: nn.Module, pipeline: str | Pipeline, calib: torch.Tensor | Sequence[torch.Tensor] | None = None,
            *, seed: int = 0, example: torch.Tensor | None = None, reference: nn.Module | None = None,
            dump_graphs: str | None = None, quiet: bool = False, set: Sequence[str] = (),
            work_dir: str | None = None, resume: bool = False, device: str | torch.device = "cpu",
            **overrides: Any) -> fx.GraphModule:
    """Quantize ``model`` with ``pipeline`` (a built-in name, a TOML path, a one-line text or a Pipeline).

    ``calib`` holds preprocessed calibration images (a tensor or a list of batches). Pass options are
    overridden by keyword (``calibrate__method="mse"``) or by ``set=["calibrate.method=mse"]``. Long passes
    checkpoint into ``work_dir`` and, with ``resume``, continue from there. Returns the
    quantized ``GraphModule``; ``gm.meta["vitqc"]`` holds the resolved pipeline, what each pass recorded and
    the per-pass statistics.
    """
    from vitqc.capture import capture  # heavy import (timm), only when compiling

    # under torchrun: one process per device (cuda:LOCAL_RANK), joint_optimize data-parallel, rank 0 alone prints
    device = distributed.resolve_device(device)
    distributed.init_from_env(distributed.backend_for(device))
    quiet = quiet or not distributed.is_main()
    dump_graphs = dump_graphs if distributed.is_main() else None
    seed_everything(seed)
    pipe = load_pipeline(pipeline)
    pipe = pipe.with_overrides(list(set) + _override_strings(overrides))
    passes = pipe.instantiate()
    batches = as_batches(calib)
    if example is None:
        if not batches:
            raise VitqcError("vitqc.compile needs calibration images or an `example` input to trace the model")
        example = batches[0][:1]
    if not isinstance(model, fx.GraphModule):
        # the example goes where the model's weights are (a model moved by an earlier compile on a GPU)
        on = next(model.parameters(), None)
        gm = capture(model, example if on is None else example.to(on.device))
    else:
        gm = model
    if reference is None:
        reference = copy.deepcopy(gm)
    reference = reference.to(device)
    ctx = CompileContext(calib=batches, reference=reference, seed=seed, quiet=quiet, work_dir=work_dir,
                         resume=resume, device=device)
    manager = PassManager(passes, dump_dir=dump_graphs)
    gm = manager(gm, ctx).graph_module
    gm.meta["vitqc"] = {"pipeline": pipe.to_dict(), "record": ctx.record,
                        "passes": [vars(s) for s in manager.stats]}
    return gm
