"""Options of passes and calibration sources: loosely typed values (TOML, JSON, ``--set`` / ``--calib`` text)
coerced to the types their dataclasses declare, and the numeric limits those dataclasses state as data."""
from __future__ import annotations

import dataclasses
import operator
import tomllib
import types
import typing
from typing import Any, Callable

from vitqc.errors import VitqcError

__all__ = ["check_limit", "check_limits", "coerce_value", "make_options", "parse_literal"]

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


def make_options(options_cls: type, values: dict[str, Any], where: Callable[[str], str],
                 unknown: Callable[[str, list[str]], str]) -> Any:
    """Instantiate an Options dataclass from loosely typed values (TOML, JSON, command-line text): each name must
    be a field (else ``VitqcError(unknown(name, field_names))``), each value is coerced to its field's type and
    checked against the class's limits; ``where(name)`` names an option in errors. Pass options (``--set``) and
    calibration-source options (``--calib``) are built by this one function."""
    fields = [f.name for f in dataclasses.fields(options_cls)]
    strangers = sorted(set(values) - set(fields))
    if strangers:
        raise VitqcError(unknown(strangers[0], fields))
    hints = typing.get_type_hints(options_cls)
    coerced = {k: coerce_value(v, hints[k], where(k)) for k, v in values.items()}
    check_limits(options_cls, coerced, where)
    return options_cls(**coerced)


def coerce_value(value: Any, hint: Any, where: str) -> Any:
    """Coerce ``value`` to the annotated type ``hint``; strings are parsed (so ``--set a.b=4`` works)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, where)
            except VitqcError as e:
                errors.append(str(e))
        raise VitqcError(errors[0] if errors else f"{where}: cannot use {value!r}")
    if origin is typing.Literal:
        for arg in args:
            try:
                if coerce_value(value, type(arg), where) == arg:
                    return arg
            except VitqcError:
                pass
        raise VitqcError(f"{where} must be one of {', '.join(map(repr, args))}, not {value!r}")
    if isinstance(value, str) and hint is not str and hint is not Any:
        value = parse_literal(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise VitqcError(f"{where} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise VitqcError(f"{where} must be an integer, not {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise VitqcError(f"{where} must be a number, not {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise VitqcError(f"{where} must be a string, not {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise VitqcError(f"{where} must be a list, not {value!r}")
        item = args[0] if args else Any
        items = [coerce_value(v, item, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise VitqcError(f"{where} must be a table like {{name = value}}, not {value!r}")
        kt, vt = args if args else (Any, Any)
        return {coerce_value(k, kt, where): coerce_value(v, vt, where) for k, v in value.items()}
    return value


def parse_literal(text: str) -> Any:
    """Parse a command-line value as a TOML value (``4``, ``0.5``, ``true``, ``[1, 2]``, ``{a = 8}``); text that
    is not one stays text (a path, a name)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
