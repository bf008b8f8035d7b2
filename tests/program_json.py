"""Helpers for tests that edit a stored program's JSON (torch.export's schema, as vitqc archives keep it)."""
from __future__ import annotations

from typing import Any


def first_symbolic_size(obj: Any) -> dict | None:
    """The first object holding an ``expr_str`` (a symbolic size's sympy text), depth first; None if there is none."""
    if isinstance(obj, dict):
        if "expr_str" in obj:
            return obj
        obj = list(obj.values())
    if isinstance(obj, list):
        for value in obj:
            found = first_symbolic_size(value)
            if found is not None:
                return found
    return None
