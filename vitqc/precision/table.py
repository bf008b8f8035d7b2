"""The mixed-precision choice as a table (printed by the pass, and from an artifact's record)."""
from __future__ import annotations

__all__ = ["assignment_table"]


def assignment_table(record: dict):
    """Rich table of a search's per-layer widths (from its record, e.g. an artifact's manifest)."""
    from rich.table import Table

    table = Table(title=f"mixed precision: W{record['average_weight_bits']:.3g} A{record['average_act_bits']:.3g} "
                        f"on average (budget W{record['weight_budget_bits']:.3g} A{record['act_budget_bits']:.3g})")
    for col in ("layer", "params", "W bits", "A elements/img", "A bits"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    fmt = lambda v: "" if v is None else f"{v:g}"  # noqa: E731
    for row in record["layers"]:
        table.add_row(row["path"], fmt(row.get("params")), fmt(row.get("weight_bits")), fmt(row.get("act_elements")),
                      fmt(row.get("act_bits")))
    uniform = record.get("uniform_fitness")
    table.caption = (f"fitness {record['fitness']:.4f}" + (f" (uniform: {uniform:.4f})" if uniform is not None else "")
                     + f"; {record['evaluations']} candidates scored on {record['images']} images in {record['seconds']:.1f}s")
    return table
