"""``vitqc report ARTIFACT [--out DIR]``: the command over :func:`vitqc.report.write_report`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def report_command(
    artifact: Annotated[Path, typer.Argument(help="a .vitqc artifact")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="report folder (default: ARTIFACT stem + .report)")] = None,
) -> None:
    """Write an HTML page with plots of what happened (per-layer SQNR, loss curves, bit widths, calibration images,
    activation ranges of the worst layers)."""
    from vitqc.console import out
    from vitqc.report import write_report

    page = write_report(artifact, out_dir)
    out.print(f"wrote {page}", highlight=False)
