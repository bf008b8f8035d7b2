"""Pipelines are data: an ordered list of pass names with options, kept as TOML.

    name = "minmax-w8a8"
    description = "..."
    [[passes]]
    name = "insert_quantizers"
    options = { weight_bits = 8, act_bits = 8 }

Built-in pipelines live in ``vitqc/pipelines/*.toml``; a user's own is given by path. In Python,
``Pipeline.from_list(["decompose_sdpa", ("calibrate", {"method": "mse"})])`` builds one, and
``Pipeline.parse("decompose_sdpa,calibrate{method=mse}")`` reads the one-line textual form.
"""
from __future__ import annotations

import copy
import importlib
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from vitqc.errors import VitqcError
from vitqc.options import parse_literal
from vitqc.passes.base import VitqcPass, get_pass, registered_passes

__all__ = ["PassStep", "Pipeline", "builtin_pipelines", "load_pipeline"]


@dataclass
class PassStep:
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def instantiate(self) -> VitqcPass:
        return get_pass(self.name)(self.options)


@dataclass
class Pipeline:
    name: str
    steps: list[PassStep]
    description: str = ""
    imports: list[str] = field(default_factory=list)  # Python modules that register the user's own passes

    # ------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_list(cls, steps: Iterable[str | tuple[str, dict[str, Any]] | PassStep], name: str = "custom",
                  description: str = "") -> "Pipeline":
        out = []
        for step in steps:
            if isinstance(step, PassStep):
                out.append(copy.deepcopy(step))
            elif isinstance(step, str):
                out.append(PassStep(step))
            else:
                pname, opts = step
                out.append(PassStep(pname, dict(opts)))
        return cls(name=name, steps=out, description=description)

    @classmethod
    def parse(cls, text: str, name: str = "custom") -> "Pipeline":
        """``"a,b{x=1,keep={head=8}},c"`` -> Pipeline (MLIR-style one-line pipeline; values are TOML)."""
        steps = []
        for item in _split_top_level(text, ","):
            match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(?:\{(.*)\})?\s*", item, re.S)
            if not match:
                raise VitqcError(f"pipeline text {text!r}: cannot read {item.strip()!r}; write pass{{option=value,...}}")
            opts = {}
            for option in _split_top_level(match.group(2) or "", ","):
                key, sep, value = option.partition("=")
                if not sep:
                    raise VitqcError(f"pipeline option {option.strip()!r} in {text!r} needs the form option=value")
                opts[key.strip()] = parse_literal(value.strip())
            steps.append(PassStep(match.group(1), opts))
        if not steps:
            raise VitqcError(f"pipeline text {text!r} names no pass")
        return cls(name=name, steps=steps)

    @classmethod
    def from_dict(cls, data: dict[str, Any], default_name: str) -> "Pipeline":
        raw = data.get("passes")
        if not isinstance(raw, list) or not raw:
            raise VitqcError(f"pipeline {default_name!r} has no [[passes]] entries")
        steps = []
        for entry in raw:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise VitqcError(f"pipeline {default_name!r}: every [[passes]] entry needs a name (a string)")
            options = entry.get("options", {})
            if not isinstance(options, dict):
                raise VitqcError(f"pipeline {default_name!r}: the options of pass {entry['name']!r} must be a table "
                                 f"(options = {{ key = value }}), not {type(options).__name__} {options!r}")
            steps.append(PassStep(entry["name"], dict(options)))
        imports = data.get("imports", [])
        if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
            raise VitqcError(f"pipeline {default_name!r}: imports must be a list of module names, e.g. imports = [\"my_passes\"]")
        for key in ("name", "description"):
            if key in data and not isinstance(data[key], str):
                raise VitqcError(f"pipeline {default_name!r}: {key} must be a string")
        return cls(name=data.get("name", default_name), steps=steps, description=data.get("description", ""),
                   imports=list(imports))

    # ------------------------------------------------------------------------------------ operations
    def import_user_passes(self) -> None:
        for module in self.imports:
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 - a user module can fail in any way (SyntaxError, NameError ...)
                where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
                first = (str(e).strip().splitlines() or [""])[0]
                raise VitqcError(f"pipeline {self.name!r} imports {module!r}, which failed: "
                                 f"{type(e).__name__}: {first}{where}") from None

    def with_overrides(self, overrides: Sequence[str]) -> "Pipeline":
        """Apply ``PASS.OPTION=VALUE`` overrides (to every step of that pass). Returns a new pipeline."""
        new = copy.deepcopy(self)
        for text in overrides:
            key, sep, value = text.partition("=")
            pass_name, dot, option = key.strip().partition(".")
            if not sep or not dot or not option:
                raise VitqcError(f"--set {text!r}: use PASS.OPTION=VALUE, e.g. --set calibrate.method=mse")
            targets = [s for s in new.steps if s.name == pass_name]
            if not targets:
                raise VitqcError(f"--set {text!r}: pipeline {self.name!r} has no pass {pass_name!r} "
                                 f"(its passes: {', '.join(s.name for s in new.steps)})")
            for step in targets:
                step.options[option] = value.strip()
        new.validate()
        return new

    def instantiate(self) -> list[VitqcPass]:
        self.import_user_passes()
        return [step.instantiate() for step in self.steps]

    def validate(self) -> None:
        self.instantiate()

    def to_dict(self, resolved: bool = True) -> dict[str, Any]:
        """JSON-able form; with ``resolved`` every option of every pass is written, defaults included."""
        if resolved:
            passes = [{"name": p.name, "options": p.options_dict()} for p in self.instantiate()]
        else:
            passes = [{"name": s.name, "options": s.options} for s in self.steps]
        return {"name": self.name, "description": self.description, "imports": self.imports, "passes": passes}

    def __str__(self) -> str:
        return ",".join(s.name + ("{" + ",".join(f"{k}={v}" for k, v in s.options.items()) + "}" if s.options else "")
                        for s in self.steps)


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, braces and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def _builtin_dir() -> Path:
    return Path(str(resources.files("vitqc") / "pipelines"))


def builtin_pipelines() -> dict[str, Pipeline]:
    out = {}
    for path in sorted(_builtin_dir().glob("*.toml")):
        out[path.stem] = Pipeline.from_dict(tomllib.loads(path.read_text()), path.stem)
    return out


def load_pipeline(spec: str | Path | Pipeline) -> Pipeline:
    """A built-in pipeline by name, a TOML file by path, or a one-line ``a,b{x=1}`` text."""
    if isinstance(spec, Pipeline):
        return spec
    text = str(spec)
    builtins = builtin_pipelines()
    if text in builtins:
        return builtins[text]
    path = Path(text)
    try:
        is_file_like = text.endswith(".toml") or path.exists()
    except OSError:  # a one-line pipeline longer than a file name can be
        is_file_like = False
    if is_file_like:
        if not path.is_file():
            raise VitqcError(f"pipeline file {text!r} not found; give a built-in name ({', '.join(builtins)}) or a TOML path")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise VitqcError(f"pipeline file {text!r} is not valid TOML: {e}") from None
        return Pipeline.from_dict(data, path.stem)
    if "," in text or "{" in text or text in registered_passes():
        return Pipeline.parse(text)
    raise VitqcError(f"unknown pipeline {text!r}; `vitqc pipelines` lists them ({', '.join(builtins)}), or give a TOML path")
