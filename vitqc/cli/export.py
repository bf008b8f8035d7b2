"""``vitqc export ARTIFACT --backend NAME``: the command over :func:`vitqc.backends.export`.

Flags that belong to one backend (``--ternary`` for packed; ``--batch``, ``--fp32``, ``--attention``,
``--exact`` for executorch) are refused with any other. Errors are one line; the output is written to a temporary file and
renamed.
``--exact`` refuses to lower what XNNPACK cannot compute exactly instead of substituting it (the
substitution and its measured cost are printed otherwise).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def export_command(
    artifact: Annotated[Path, typer.Argument(help="a .vitqc artifact from `vitqc compile`")],
    backend: Annotated[str, typer.Option("--backend", "-b", help="packed | executorch (`vitqc backends` lists them)")],
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="output (default: ARTIFACT stem + the backend's suffix)")] = None,
    ternary: Annotated[Optional[str], typer.Option("--ternary", help="packed: ternary weights as 2bit (4 a byte) or base3 (5 a byte)")] = None,
    batch: Annotated[Optional[int], typer.Option("--batch", help="executorch: static batch size of the program")] = None,
    fp32: Annotated[Optional[bool], typer.Option("--fp32", help="executorch: lower the float model (dequantized weights, no quantization) as a baseline")] = None,
    attention: Annotated[Optional[str], typer.Option("--attention", help="executorch: vitqc (attention matmuls on vitqc's codes) | fp32 (float attention matmuls: faster, not vitqc's scheme)")] = None,
    exact: Annotated[Optional[bool], typer.Option("--exact", help="executorch: refuse to lower what XNNPACK cannot compute exactly (float rounding aside) instead of substituting it")] = None,
) -> None:
    """Lower an artifact to packed integer kernels or an ExecuTorch XNNPACK program (.pte)."""
    from vitqc.backends import export
    from vitqc.console import out

    options = {k: v for k, v in (("ternary", ternary), ("batch", batch), ("fp32", fp32), ("attention", attention),
                                                 ("exact", exact))
               if v is not None}
    path = export(artifact, backend, out_path, say=lambda line: out.print(line, highlight=False), **options)
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)", highlight=False)
