"""``vitqc pipelines | passes [NAME] | sources | backends``: what is built in and registered."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from vitqc.console import out


def pipelines_command() -> None:
    """List the built-in pipelines."""
    from vitqc.pipeline import builtin_pipelines

    for name, pipe in builtin_pipelines().items():
        out.print(f"[bold]{name:<22}[/] {pipe.description}", highlight=False)


def sources_command() -> None:
    """List the calibration sources --calib takes."""
    from vitqc.calib.spec import SOURCES

    for name, cls in SOURCES.items().items():
        out.print(f"[bold]{name:<16}[/] {cls.summary}", highlight=False, markup=True)


def backends_command() -> None:
    """List the backends `vitqc export` lowers to."""
    import dataclasses

    from vitqc.backends import BACKENDS

    for name, cls in BACKENDS.items().items():
        opts = " ".join(f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls.Options))
        out.print(f"[bold]{name:<12}[/] {cls.summary} (writes *{cls.suffix}; options: {opts or 'none'})",
                  highlight=False)


def passes_command(
    name: Annotated[Optional[str], typer.Argument(help="a pass: show its file, requires/ensures and options")] = None,
) -> None:
    """List the registered passes, or describe one."""
    import dataclasses
    import inspect

    from vitqc.passes.base import get_pass, registered_passes

    if name is None:
        for pass_name, cls in registered_passes().items():
            out.print(f"[bold]{pass_name:<22}[/] {cls.summary}", highlight=False)
        return
    cls = get_pass(name)
    out.print(f"[bold]{cls.name}[/]: {cls.summary}", highlight=False)
    out.print(f"defined in {inspect.getsourcefile(cls)} ({cls.__module__}.{cls.__qualname__})", highlight=False)
    out.print(f"requires: {', '.join(cls.requires) or '-'}; ensures: {', '.join(cls.ensures) or '-'}", highlight=False)
    fields = dataclasses.fields(cls.Options) if dataclasses.is_dataclass(cls.Options) else ()
    if not fields:
        out.print("options: none")
        return
    limits = getattr(cls.Options, "limits", {})
    out.print(f"options (--set {cls.name}.OPTION=VALUE):", highlight=False)
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = f"  ({limits[f.name]})" if f.name in limits else ""
        out.print(f"  {f.name}: {f.type} = {default!r}{allowed}", highlight=False, markup=False)
