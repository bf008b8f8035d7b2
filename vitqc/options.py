"""Numeric limits of options, stated as data by the options dataclasses of passes and calibration sources."""
from __future__ import annotations

import operator
from typing import Any, Callable

from vitqc.errors import VitqcError

__all__ = ["check_limit", "check_limits"]

_COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def check_limit(value: Any, limit: str, where: str) -> None:
    """An Options class states its numeric ranges as data, in a ``limits`` class attribute of readable
    conditions: ``{"batch_size": ">= 1", "temperature": "> 0", "alpha": "0 to 1"}`` (``to`` is inclusive)."""
    if value is None:
        return
    if " to " in limit:
        lo, hi = (float(b) for b in limit.split(" to "))
        ok, wanted = lo <= value <= hi, f"between {limit.replace(' to ', ' and ')}"
    else:
        op, _, bound = limit.partition(" ")
        if op not in _COMPARISONS:
            raise ValueError(f"bad limit {limit!r} for {where}: write '>= N', '> N', '<= N', '< N' or 'A to B'")
        ok, wanted = _COMPARISONS[op](value, float(bound)), limit
    if not ok:
        raise VitqcError(f"{where} must be {wanted}, not {value!r}")


def check_limits(options_cls: type, values: dict[str, Any], where: Callable[[str], str]) -> None:
    """Check ``values`` (option name -> value) against ``options_cls.limits``; ``where(name)`` names the option
    in the error (``joint_optimize.batch_size``, ``--calib inversion option steps``)."""
    limits = getattr(options_cls, "limits", {})
    for key, value in values.items():
        if key in limits:
            check_limit(value, limits[key], where(key))
