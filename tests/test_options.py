"""vitqc.options: loosely typed option values coerced to their dataclass's types, and limits stated as data."""
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from vitqc.errors import VitqcError
from vitqc.options import check_limit, coerce_value, make_options, parse_literal


@dataclass
class Opts:
    steps: int = 3
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    bits: float | None = None
    names: list[str] = field(default_factory=list)
    widths: dict[str, float] = field(default_factory=dict)
    limits: ClassVar[dict[str, str]] = {"steps": ">= 1", "rate": "0 to 1"}


def build(**values):
    return make_options(Opts, values, lambda k: f"p.{k}", lambda name, valid: f"no option {name!r} ({', '.join(valid)})")


def test_text_values_are_parsed_as_toml_and_coerced():
    o = build(steps="4", rate="0.5", mode="b", flag="true", bits="none", names="x,y", widths={"head": 8})
    assert (o.steps, o.rate, o.mode, o.flag, o.bits, o.names, o.widths) == (4, 0.5, "b", True, None, ["x", "y"],
                                                                           {"head": 8.0})
    assert build(steps=4.0).steps == 4 and build(bits="6").bits == 6.0


@pytest.mark.parametrize("values, message", [
    ({"stepz": 1}, "no option 'stepz' (steps, rate"),
    ({"steps": "2.5"}, "p.steps must be an integer, not 2.5"),
    ({"steps": 0}, "p.steps must be >= 1, not 0"),
    ({"rate": 2}, "p.rate must be between 0 and 1, not 2.0"),
    ({"mode": "c"}, "p.mode must be one of 'a', 'b', not 'c'"),
    ({"flag": "yes"}, "p.flag must be true or false"),
    ({"widths": 5}, "p.widths must be a table"),
    ({"names": 5}, "p.names must be a list"),
])
def test_bad_values_are_one_line(values, message):
    with pytest.raises(VitqcError, match=message.replace("(", r"\(")):
        build(**values)


def test_limits_and_literals():
    check_limit(None, ">= 1", "x")  # an unset optional value has no limit
    with pytest.raises(ValueError, match="bad limit"):
        check_limit(1, "about 3", "x")
    assert parse_literal("[1, 2]") == [1, 2] and parse_literal("{a = 8}") == {"a": 8}
    assert parse_literal("some/path.txt") == "some/path.txt"
    assert coerce_value("3", int | None, "x") == 3
