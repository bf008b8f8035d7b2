"""How commands print results: tables and one-line summaries on stdout (through vitqc.console)."""
from __future__ import annotations

from typing import Any, Iterable

from rich.table import Table


def bits(value: Any) -> str:
    return "" if value is None else (f"{value:g}" if isinstance(value, float) else str(value))


def layer_table(layers: Iterable[dict], sqnr: dict[str, float | None], title: str) -> Table:
    """One row per weight layer; attention matmul/softmax quantizers are summarised in the caption."""
    layers = list(layers)
    table = Table(title=title, show_lines=False)
    for col in ("layer", "kind", "W bits", "A bits", "SQNR dB"):
        table.add_column(col, justify="right" if col != "layer" else "left")
    attention = [l for l in layers if l["kind"] in ("matmul", "softmax")]
    for layer in layers:
        if layer in attention:
            continue
        value = sqnr.get(layer["path"])
        table.add_row(layer["path"], layer["kind"], bits(layer.get("weight_bits")), bits(layer.get("act_bits")),
                      "" if value is None else f"{value:.1f}")
    if attention:
        widths = sorted({bits(l["act_bits"]) for l in attention})
        table.caption = (f"+ {sum(l['kind'] == 'matmul' for l in attention)} attention matmuls (both inputs) and "
                         f"{sum(l['kind'] == 'softmax' for l in attention)} softmax outputs at A{'/'.join(widths)}")
    return table


def measurement_lines(measurement: dict[str, Any], pipeline: str) -> list[str]:
    """Agreement (and top-1 when labelled) of a compile's measurement, saying on what it was measured."""
    m = measurement
    lines = [f"agreement with FP on {m['data']}: {m['agreement']:.2%}"]
    if m.get("labeled"):
        lines.append(f"top-1 on {m['data']} ({m['labeled']} images): FP {m['reference_top1']:.2%}  {pipeline} "
                     f"{m['quantized_top1']:.2%}")
    return lines
