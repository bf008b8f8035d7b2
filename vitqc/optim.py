"""Adam over many parameter groups in one multi-tensor update.

joint_optimize gives every trainable tensor its own group (each quantizer step learns at a rate relative to
its initial size) and so has ~240 groups of one tensor on ViT-S. ``torch.optim.Adam`` steps group by group:
per group a Python call chain and, fused on a GPU, one kernel launch; single-tensor on a CPU, ~8 small kernels.
In a step that is bound by launch and host overhead (joint_optimize on a GPU, or any torch.compile'd step)
that loop is a large share of the step. :class:`GroupedAdam` does the same arithmetic as torch's multi-tensor
(``foreach``) Adam over the parameters of *all* groups at once, each at its own group's learning rate (the
foreach kernels take one scalar per tensor): ~10 foreach calls per step whatever the number of groups.

Its state and ``state_dict`` are ``torch.optim.Adam``'s (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter),
so learning-rate schedulers work on its groups and checkpoints load either way. Only what joint_optimize uses
is supported: no weight decay, AMSGrad, maximize or capturable mode (refused by the constructor).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

__all__ = ["GroupedAdam"]


class GroupedAdam(torch.optim.Adam):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=True)
        for g in self.param_groups:
            if g["weight_decay"] or g["amsgrad"] or g["maximize"] or g["capturable"]:
                raise ValueError("GroupedAdam supports plain Adam only (no weight_decay, amsgrad, maximize, capturable)")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # one list per (device, dtype), as the foreach kernels want; each tensor with its group's settings
        buckets: dict[tuple, dict[str, list]] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:  # e.g. another stage's parameters in block-wise mode: left as they are
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GroupedAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    # as torch.optim.Adam (non-capturable): a float32 step count on the CPU
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                b = buckets.setdefault((p.device, p.dtype, beta1, beta2, group["eps"]),
                                       {"params": [], "grads": [], "m": [], "v": [], "steps": [], "lrs": []})
                b["params"].append(p)
                b["grads"].append(p.grad)
                b["m"].append(state["exp_avg"])
                b["v"].append(state["exp_avg_sq"])
                b["steps"].append(state["step"])
                b["lrs"].append(group["lr"])
        for (_, _, beta1, beta2, eps), b in buckets.items():
            _adam_update(b, beta1, beta2, eps)
        return loss


def _adam_update(b: dict[str, list], beta1: float, beta2: float, eps: float) -> None:
    """torch.optim.Adam's multi-tensor update (``_multi_tensor_adam``, non-capturable), op for op, with one
    learning rate per tensor instead of one per call: bit-identical to it group by group."""
    steps: list[Tensor] = b["steps"]
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(b["m"], b["grads"], 1 - beta1)
    torch._foreach_mul_(b["v"], beta2)
    torch._foreach_addcmul_(b["v"], b["grads"], b["grads"], 1 - beta2)
    counts = [float(s) for s in steps]  # CPU scalars: no device sync
    step_size = [(lr / (1 - beta1**n)) * -1 for lr, n in zip(b["lrs"], counts)]
    bias_correction2_sqrt = [(1 - beta2**n) ** 0.5 for n in counts]
    denom = torch._foreach_sqrt(b["v"])
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(b["params"], b["m"], denom, step_size)
