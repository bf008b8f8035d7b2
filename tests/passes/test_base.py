"""The pass API: registration, typed options, requires/ensures, the manager's summary and dumps."""
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from torch import fx, nn

import vitqc
from vitqc.errors import PassCheckFailed, VitqcError
from vitqc.passes.base import CompileContext, build_options, get_pass, registered_passes
from vitqc.passes.manager import PassManager


class AddOne(nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


@dataclass
class ScaleOptions:
    factor: float = 2.0
    names: list[str] = field(default_factory=list)
    table: dict[str, int] = field(default_factory=dict)
    flag: bool = False


@vitqc.graph_property("has_mul")
def has_mul(gm):
    """A mul node exists."""
    return any(n.target is torch.mul for n in gm.graph.nodes)


@vitqc.register_pass
class AppendScale(vitqc.VitqcPass):
    name = "test_append_scale"
    summary = "multiply the output by a constant"
    Options = ScaleOptions
    ensures = ("has_mul",)

    def call(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            mul = gm.graph.call_function(torch.mul, (out.args[0], self.options.factor))
        out.replace_input_with(out.args[0], mul)
        gm.recompile()
        return vitqc.PassResult(gm, True)


@vitqc.register_pass
class NeedsMul(vitqc.VitqcPass):
    name = "test_needs_mul"
    summary = "does nothing, but only after a mul exists"
    requires = ("has_mul",)

    def call(self, gm, ctx):
        return vitqc.PassResult(gm, False)


def test_registered_pass_is_found_by_name_and_builtins_are_listed():
    assert get_pass("test_append_scale") is AppendScale
    names = registered_passes()
    for builtin in ("canonicalize", "insert_quantizers", "calibrate", "materialize"):
        assert builtin in names and names[builtin].summary


def test_unknown_pass_names_the_listing_command():
    with pytest.raises(VitqcError, match="unknown pass 'nope'.*vitqc passes"):
        get_pass("nope")


def test_options_are_coerced_from_strings_and_validated():
    opts = build_options(ScaleOptions, {"factor": "3", "names": "a,b", "table": "{x = 1}", "flag": "true"}, "p")
    assert opts == ScaleOptions(factor=3.0, names=["a", "b"], table={"x": 1}, flag=True)
    with pytest.raises(VitqcError, match="unknown option 'fator' for pass 'p'.*factor"):
        build_options(ScaleOptions, {"fator": 1}, "p")
    with pytest.raises(VitqcError, match="p.factor must be a number"):
        build_options(ScaleOptions, {"factor": "big"}, "p")
    with pytest.raises(VitqcError, match="p.flag must be true or false"):
        build_options(ScaleOptions, {"flag": "maybe"}, "p")


@dataclass
class LimitedOptions:
    batch_size: int = 32
    temperature: float = 1.0
    alpha: float = 0.5
    limits: ClassVar[dict[str, str]] = {"batch_size": ">= 1", "temperature": "> 0", "alpha": "0 to 1"}


def test_option_limits_are_checked_with_a_one_line_error():
    assert build_options(LimitedOptions, {"batch_size": "1", "temperature": "0.01", "alpha": "1"}, "p") == \
        LimitedOptions(batch_size=1, temperature=0.01, alpha=1.0)
    with pytest.raises(VitqcError, match=r"^p.batch_size must be >= 1, not 0$"):
        build_options(LimitedOptions, {"batch_size": 0}, "p")
    with pytest.raises(VitqcError, match=r"^p.temperature must be > 0, not 0.0$"):
        build_options(LimitedOptions, {"temperature": "0"}, "p")
    with pytest.raises(VitqcError, match=r"^p.alpha must be between 0 and 1, not 1.5$"):
        build_options(LimitedOptions, {"alpha": 1.5}, "p")


@pytest.mark.parametrize("option, value", [("joint_optimize.batch_size", "0"), ("joint_optimize.iterations", "-1"),
                                           ("channel_rescale.alpha", "2"), ("calibrate.percentile", "0"),
                                           ("weight_refine.regularization", "-1")])
def test_builtin_passes_refuse_out_of_range_options(option, value):
    name, key = option.split(".")
    with pytest.raises(VitqcError, match=rf"^{option} must be"):
        get_pass(name)(**{key: value})


def test_requires_fails_with_the_pass_that_provides_it_and_ensures_holds():
    gm = fx.symbolic_trace(AddOne())
    with pytest.raises(PassCheckFailed, match="requires 'has_mul'.*test_append_scale"):
        NeedsMul()(gm)
    result = AppendScale(factor=3)(gm)
    assert result.modified
    assert torch.equal(result.graph_module(torch.tensor([-1.0, 2.0])), torch.tensor([3.0, 9.0]))
    assert NeedsMul()(result.graph_module).modified is False


def test_ensures_violation_is_reported():
    @vitqc.register_pass
    class Liar(vitqc.VitqcPass):
        name = "test_liar"
        ensures = ("has_mul",)

        def call(self, gm, ctx):
            return vitqc.PassResult(gm, False)

    with pytest.raises(PassCheckFailed, match="should ensure 'has_mul'"):
        Liar()(fx.symbolic_trace(AddOne()))


def test_manager_counts_nodes_and_dumps_each_graph(tmp_path):
    gm = fx.symbolic_trace(AddOne())
    manager = PassManager([AppendScale(), NeedsMul()], dump_dir=tmp_path, console=None)
    result = manager(gm, CompileContext(quiet=True))
    assert result.modified
    first, second = manager.stats
    assert (first.added, first.removed, first.changed) == (1, 0, 1)  # the mul; the output node now reads it
    assert not second.modified and (second.added, second.removed) == (0, 0)
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["00_captured.txt", "01_test_append_scale.txt", "02_test_needs_mul.txt"]
    assert "torch.mul" in (tmp_path / "01_test_append_scale.txt").read_text()
