"""LayerNorm inside an XNNPACK ``.pte``: vitqc's reproducible form (``vitqc.quant.pairwise_layer_norm``) with its
sums as the lowering restates them (``xnnpack_rewrite.pairwise_sums_transposed``: halves along the last dim, then
on transposed rows) and sliced along the last dim to the end (the exported graph as it is), against ATen's
LayerNorm as vitqc's lowering restates it for XNNPACK (means and ``rsqrt``: the fp32 baseline a user would
otherwise get).

    python benchmarks/pte_layer_norm.py [--runs 30] [--tag TAG]

Per shape (batch 8 x tokens x width of vit_tiny_cifar10, vits14_cifar10 and ViT-S/16 at 224 px): a program of 4
LayerNorms in a row is lowered each way; medians of ``--runs`` calls, interleaved, in ms per LayerNorm; and whether
each vitqc form's ``.pte`` gives the program's values bit for bit. One thread (torch's and ExecuTorch's).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from unittest import mock

import torch
import torch.nn.functional as F

from common import cpu_model, write_result
from executorch_pte import executorch_threads
from float_ops import timed

SHAPES = {"vit_tiny_cifar10 b8": (8, 65, 64), "vits14_cifar10 b8": (8, 65, 384),
          "vit_small_patch16_224 b8": (8, 197, 384)}
NORMS = 4


class Norms(torch.nn.Module):
    def __init__(self, width: int, form: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(width)
        self.register_buffer("w", torch.rand(width, generator=g) + 0.5)
        self.register_buffer("b", torch.randn(width, generator=g))
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from vitqc.quant.pairwise_layer_norm import pairwise_layer_norm

        for _ in range(NORMS):
            x = F.layer_norm(x, (x.shape[-1],), self.w, self.b, 1e-6) if self.form == "aten" \
                else pairwise_layer_norm(x, self.w, self.b, 1e-6)
        return x


def lowered(module: torch.nn.Module, x: torch.Tensor, transpose_sums: bool):
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from vitqc.backends import xnnpack_rewrite
    from vitqc.backends.executorch import xnnpack_partitioner

    keep = mock.patch.object(xnnpack_rewrite, "pairwise_sums_transposed", lambda g: 0)
    with torch.no_grad(), (contextlib.nullcontext() if transpose_sums else keep):
        graph = xnnpack_rewrite.xnnpack_supported_ops(torch.export.export(module, (x,), strict=False).module())
        program = torch.export.export(graph, (x,), strict=False)
    edge = to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()])
    loaded = Runtime.get().load_program(edge.to_executorch().buffer)
    method = loaded.load_method("forward")
    method.program = loaded  # a method outlives nothing it was loaded from
    return method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    executorch_threads(1)
    rows = []
    for label, shape in SHAPES.items():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
        vitqc_norms = Norms(shape[-1], "vitqc")
        with torch.no_grad():
            expected = torch.export.export(vitqc_norms, (x,), strict=False).module()(x)
        methods = {"aten (XNNPACK means, rsqrt)": lowered(Norms(shape[-1], "aten"), x, True),
                   "vitqc, sums sliced along the last dim": lowered(vitqc_norms, x, False),
                   "vitqc, as lowered (halves along C down to width 64, then on transposed rows)": lowered(vitqc_norms, x, True)}
        ms = timed({k: (lambda m=m: m.execute([x])) for k, m in methods.items()}, args.runs)
        row = {"shape": label, "input": list(shape), "ms_per_layer_norm": {k: round(v / NORMS, 3) for k, v in ms.items()},
               "bit_for_bit": {k: bool(torch.equal(m.execute([x])[0], expected))
                               for k, m in methods.items() if k.startswith("vitqc")}}
        rows.append(row)
        print(row, flush=True)
    write_result("pte_layer_norm", {"rows": rows, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": 1,
                                    "norms_per_program": NORMS, "runs": args.runs, "load_avg": os.getloadavg()},
                 args.tag)


if __name__ == "__main__":
    main()
