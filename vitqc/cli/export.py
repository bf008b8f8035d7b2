"""``vitqc export ARTIFACT --backend packed|executorch --out PATH``: lower an artifact to deployable code.

* ``packed``: a ``torch.export`` program (``.pt2``) whose linear layers, patch embedding and attention matmuls
  run integer kernels over bit-packed weights (:mod:`vitqc.backends.packed`); load it with
  ``vitqc.backends.packed.load_packed(PATH).module()``.
* ``executorch``: an XNNPACK ``.pte`` (:mod:`vitqc.backends.executorch`); what XNNPACK runs, and what of
  vitqc's scheme it cannot run exactly with its measured cost, is printed in one line before lowering;
  ``--exact`` refuses such a substitution instead.

Errors are one line (``VitqcError``, exit 2); the output is written to a temporary file and renamed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitqc.cli.main import app, err, out
from vitqc.errors import VitqcError

BACKENDS = ("packed", "executorch")


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="a .vitqc artifact from `vitqc compile`")],
    backend: Annotated[str, typer.Option("--backend", "-b", help="packed | executorch")],
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="output (default: ARTIFACT stem + .packed.pt2 / .pte)")] = None,
    ternary: Annotated[str, typer.Option("--ternary", help="packed: ternary weights as 2bit (4 a byte) or base3 (5 a byte)")] = "2bit",
    batch: Annotated[int, typer.Option("--batch", help="executorch: static batch size of the program")] = 1,
    fp32: Annotated[bool, typer.Option("--fp32", help="executorch: lower the float model (dequantized weights, no quantization) as a baseline")] = False,
    attention: Annotated[str, typer.Option("--attention", help="executorch: vitqc (attention matmuls on vitqc's codes) | fp32 (float attention matmuls: faster, not vitqc's scheme)")] = "vitqc",
    exact: Annotated[bool, typer.Option("--exact", help="refuse to lower what the backend cannot compute exactly (float rounding aside) instead of substituting it; the packed backend is always exact")] = False,
) -> None:
    """Lower an artifact to packed integer kernels (.pt2) or an ExecuTorch XNNPACK program (.pte)."""
    from vitqc.artifact import check_writable, load_artifact

    if backend not in BACKENDS:
        raise VitqcError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if ternary not in ("2bit", "base3"):
        raise VitqcError(f"--ternary must be 2bit or base3, got {ternary!r}")
    if batch < 1:
        raise VitqcError(f"--batch must be at least 1, got {batch}")
    from vitqc.backends.executorch import ATTENTION

    if attention not in ATTENTION:
        raise VitqcError(f"--attention must be {' or '.join(ATTENTION)}, got {attention!r}")
    if (fp32 or batch != 1 or attention != "vitqc") and backend != "executorch":
        raise VitqcError("--fp32, --batch and --attention apply to --backend executorch only")
    suffix = ".packed.pt2" if backend == "packed" else (".fp32.pte" if fp32 else ".pte")
    target = check_writable(out_path or Path(artifact.name.removesuffix(".vitqc") + suffix))
    art = load_artifact(artifact)
    if backend == "packed":
        from vitqc.backends.packed import lower_packed, save_packed

        err.print(f"[bold cyan]lower[/] {artifact} to packed integer kernels")
        packed = lower_packed(art, ternary=ternary)
        path = save_packed(packed, target)
        s = packed.manifest["summary"]
        bits = 8 * (s["packed_bytes"] + s["per_channel_bytes"]) / max(s["weight_params"], 1)
        out.print(f"lowered {s['weight_layers']} weight layers and {s['attention_matmuls']} attention matmuls"
                  f" ({s['not_lowered']} left as the artifact runs them)", highlight=False)
        for item in packed.manifest["not_lowered"]:
            out.print(f"  not lowered: {item['path']}: {item['reason']}", highlight=False)
        out.print(f"weights: {s['packed_bytes']:,} packed bytes + {s['per_channel_bytes']:,} bytes of scales/zero "
                  f"points for {s['weight_params']:,} weights ({bits:.2f} bits/weight)", highlight=False)
    else:
        from vitqc.backends.executorch import lower_executorch, save_pte

        err.print(f"[bold cyan]lower[/] {artifact} to ExecuTorch (XNNPACK){' fp32 baseline' if fp32 else ''}")
        result = lower_executorch(art, fp32=fp32, batch=batch, attention=attention, exact=exact,
                                  announce=lambda line: out.print(line, highlight=False))
        path = save_pte(result, target)
        portable = ", ".join(f"{name} x{n}" for name, n in result.portable_ops.items()) or "none"
        out.print(f"{result.delegates} XNNPACK delegate segments; on portable kernels between them: {portable}",
                  highlight=False)
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", highlight=False)
