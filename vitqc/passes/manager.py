"""Runs a pipeline of passes over a GraphModule, with a one-line summary per pass and optional graph dumps."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console
from torch import fx

from vitqc.passes.base import CompileContext, PassResult, VitqcPass


@dataclass
class PassStat:
    name: str
    added: int
    removed: int
    changed: int
    modified: bool
    seconds: float

    def line(self) -> str:
        if not self.modified:
            return f"{self.name:<24} unchanged                         {self.seconds:7.2f}s"
        return (f"{self.name:<24} +{self.added:<4} nodes  -{self.removed:<4} nodes  ~{self.changed:<4} changed"
                f" {self.seconds:7.2f}s")


def _node_signature(gm: fx.GraphModule) -> dict[str, str]:
    """name -> what the node computes, so a pass's effect can be counted as added / removed / changed."""
    sig = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_module":
            target = f"{node.target}:{type(gm.get_submodule(node.target)).__name__}"
        sig[node.name] = f"{node.op}|{target}|{node.args}|{node.kwargs}"
    return sig


class PassManager:
    """Run ``passes`` in order. Each pass's requires/ensures are checked around it (see VitqcPass.__call__)."""

    def __init__(self, passes: Sequence[VitqcPass], dump_dir: str | Path | None = None,
                 console: Console | None = None) -> None:
        self.passes = list(passes)
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.console = console or Console(stderr=True)
        self.stats: list[PassStat] = []

    def __call__(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        any_modified = False
        if self.dump_dir:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            self._dump(gm, 0, "captured")
        for index, pass_ in enumerate(self.passes, start=1):
            before = _node_signature(gm)
            start = time.perf_counter()
            # Every pass sees the graph on the compile device: modules a previous pass inserted were built
            # on the CPU (Module.to is a no-op for tensors already there).
            gm = gm.to(ctx.device)
            result = pass_(gm, ctx)
            gm = result.graph_module
            after = _node_signature(gm)
            stat = PassStat(
                name=pass_.name,
                added=len(after.keys() - before.keys()),
                removed=len(before.keys() - after.keys()),
                changed=sum(1 for k in after.keys() & before.keys() if after[k] != before[k]),
                modified=bool(result.modified),
                seconds=time.perf_counter() - start,
            )
            self.stats.append(stat)
            any_modified |= stat.modified
            if not ctx.quiet:
                self.console.print(f"[bold cyan]pass[/] {stat.line()}")
            if self.dump_dir:
                self._dump(gm, index, pass_.name)
        return PassResult(gm, any_modified)

    def _dump(self, gm: fx.GraphModule, index: int, name: str) -> None:
        assert self.dump_dir is not None
        rows = [f"{n.op:<14} {n.name:<40} {str(n.target):<50} {n.args}" for n in gm.graph.nodes]
        text = f"# after {name}\n# {len(rows)} nodes\n" + "\n".join(rows) + "\n\n# code\n" + gm.code
        (self.dump_dir / f"{index:02d}_{name}.txt").write_text(text)
