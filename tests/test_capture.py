"""Capture (VitqcTracer) + canonicalize on small ViT-family models: the graph must equal eager."""
from __future__ import annotations

import operator

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.capture import VitqcTracer, capture, max_abs_diff, register_leaf_module
from vitqc.errors import TraceFailure
from vitqc.passes.base import check_property, get_pass
from vitqc.passes.properties import SDPA_TARGETS

ATOL = 1e-5


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


def _count_attention(gm: fx.GraphModule) -> tuple[int, int]:
    matmuls = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.matmul)
    softmaxes = sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "softmax")
    return matmuls, softmaxes


def _capture_and_canonicalize(model: nn.Module, x: torch.Tensor, n_attention: int) -> fx.GraphModule:
    model.eval()
    want = _run(model, x)
    gm = capture(model, x)
    assert max_abs_diff(_run(gm, x), want) <= ATOL
    result = get_pass("canonicalize")()(gm)
    gm = result.graph_module
    assert result.modified
    assert max_abs_diff(_run(gm, x), want) <= ATOL
    # nothing fused / black-box / dropout is left; attention is explicit
    assert check_property("canonical", gm)
    for node in gm.graph.nodes:
        assert not (node.op == "call_function" and node.target in SDPA_TARGETS)
        if node.op == "call_module":
            assert not isinstance(gm.get_submodule(node.target), (nn.MultiheadAttention, nn.Dropout, nn.Identity))
    assert _count_attention(gm) == (2 * n_attention, n_attention)
    # idempotent
    assert get_pass("canonicalize")()(gm).modified is False
    assert max_abs_diff(_run(gm, x), want) <= ATOL
    return gm


def _seeded_input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------- timm models
def test_vit() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    gm = _capture_and_canonicalize(model, _seeded_input(2, 3, 32, 32), n_attention=2)
    # ownership metadata: the attention matmuls belong to blocks.N.attn, the qkv Linear too
    owners = {n.meta["vitqc_owner"] for n in gm.graph.nodes
              if n.op == "call_function" and n.target is operator.matmul}
    assert owners == {"blocks.0.attn", "blocks.1.attn"}
    qkv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "blocks.0.attn.qkv")
    assert qkv.meta["vitqc_owner"] == "blocks.0.attn"
    assert all("vitqc_owner" in n.meta for n in gm.graph.nodes)
    assert isinstance(gm.get_submodule("blocks.0.attn.qkv"), nn.Linear)
    assert gm.meta["vitqc"]["captured_from"] == "VisionTransformer"
    assert not gm.training
    # the graph takes only the image (timm's attn_mask/is_causal defaults are specialised away)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]


def test_deit_distilled() -> None:
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              depth=2)
    _capture_and_canonicalize(model, _seeded_input(2, 3, 32, 32), n_attention=2)


def _swin() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                              embed_dim=16, depths=(2, 2), num_heads=(1, 2))
    # the second block of stage 0 uses shifted windows (and so an attention mask)
    assert model.layers[0].blocks[1].attn_mask is not None
    assert model.layers[0].blocks[1].shift_size != (0, 0)
    # non-trivial relative position bias
    for module in model.modules():
        if hasattr(module, "relative_position_bias_table"):
            nn.init.normal_(module.relative_position_bias_table, std=1.0)
    return model


def test_swin_window_attention() -> None:
    _capture_and_canonicalize(_swin(), _seeded_input(2, 3, 32, 32), n_attention=4)


def test_swin_fused_attention_with_mask() -> None:
    model = _swin()
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_attn") and hasattr(module, "relative_position_bias_table"):
            module.fused_attn = True  # sdpa with the float (rel-pos bias + shift) mask
            n += 1
    x = _seeded_input(2, 3, 32, 32)
    gm = capture(model, x)
    assert sum(1 for nd in gm.graph.nodes if nd.op == "call_function" and nd.target in SDPA_TARGETS) == n == 4
    _capture_and_canonicalize(model, x, n_attention=4)
    # without an example input the mask dtype and head dim are unknown: run-time helpers, same numbers
    gm = get_pass("canonicalize")()(capture(model)).graph_module
    assert max_abs_diff(_run(gm, x), _run(model, x)) <= ATOL


def test_dinov2_layer_scale() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, embed_dim=32, depth=2,
                              num_heads=2)
    gammas = [p for name, p in model.named_parameters() if name.endswith("gamma")]
    assert len(gammas) == 4  # ls1, ls2 per block
    with torch.no_grad():
        for g in gammas:
            g.normal_(0.0, 1.0)
    _capture_and_canonicalize(model, _seeded_input(2, 3, 28, 28), n_attention=2)


# ----------------------------------------------------------------------- torch.nn.TransformerEncoder ViT
class EncoderViT(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2, img: int = 32, patch: int = 8,
                 norm_first: bool = False, batch_first: bool = True, activation: str | nn.Module = "relu") -> None:
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, batch_first=batch_first,
                                           norm_first=norm_first, activation=activation)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x)
        x = x[:, 0] if self.batch_first else x[0]
        return self.head(x)


@pytest.mark.parametrize("norm_first,batch_first,activation", [
    (False, True, "relu"),
    (True, False, "gelu"),
    (False, True, nn.GELU()),
])
def test_transformer_encoder_vit(norm_first: bool, batch_first: bool, activation) -> None:
    torch.manual_seed(0)
    model = EncoderViT(norm_first=norm_first, batch_first=batch_first, activation=activation)
    x = _seeded_input(2, 3, 32, 32)
    gm = capture(model, x)
    # the encoder layers are traced through; MultiheadAttention stays a black box until decompose_mha
    mha = [n.target for n in gm.graph.nodes
           if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)]
    assert mha == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert {"encoder.layers.0.linear1", "encoder.layers.1.norm2"} <= {n.target for n in gm.graph.nodes}
    gm = _capture_and_canonicalize(model, x, n_attention=2)
    assert isinstance(gm.get_submodule("encoder.layers.0.self_attn.in_proj"), nn.Linear)
    with torch.enable_grad():  # eager slow path too
        assert max_abs_diff(gm(x), model(x)) <= ATOL


# ------------------------------------------------------------------------------------------------ tracer
class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return x
        return -x


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


def test_untraceable_model_names_module_and_node() -> None:
    with pytest.raises(TraceFailure) as info:
        capture(Untraceable())
    msg = str(info.value)
    assert "\n" not in msg
    assert "'gate'" in msg and "Gate" in msg
    assert "after node 'gt'" in msg
    assert "register_leaf_module" in msg


def test_register_leaf_module_makes_it_traceable() -> None:
    class LeafGate(Gate):
        pass

    register_leaf_module(LeafGate)
    model = Untraceable()
    model.gate = LeafGate()
    x = torch.randn(3, 4)
    gm = capture(model, x)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc", "gate"]


def test_capture_check_catches_disagreement() -> None:
    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn_like(x)

    with pytest.raises(TraceFailure, match="disagrees with the eager model"):
        capture(Noisy(), torch.zeros(2, 3))
    capture(Noisy(), torch.zeros(2, 3), check=False)


def test_tracer_uses_timm_notrace_registry() -> None:
    from timm.layers import get_notrace_functions, get_notrace_modules

    tracer = VitqcTracer()
    assert nn.MultiheadAttention in tracer.leaf_types
    assert set(get_notrace_modules()) <= set(tracer.timm_leaf_types)
    assert {id(f) for f in get_notrace_functions() if callable(f)} <= set(tracer._autowrap_function_ids)


def test_functional_dropout_and_owner_of_functions() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.dropout(F.gelu(self.fc(x)), 0.1, training=self.training)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x) * 2

    gm = capture(Net(), torch.randn(2, 8))
    owners = {n.name: n.meta["vitqc_owner"] for n in gm.graph.nodes}
    assert owners["gelu"] == "block" and owners["block_fc"] == "block" and owners["mul"] == ""
    assert owners["x"] == "" and owners["output"] == ""


# ------------------------------------------------------------------------------------ front ends (issue 21)
def _canonical(gm: fx.GraphModule) -> fx.GraphModule:
    return get_pass("canonicalize")()(gm).graph_module


def _layers(gm: fx.GraphModule) -> dict[str, str]:
    """Weight layers and norms called as modules (activations may be a module call or a function call)."""
    return {str(n.target): type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"
            and not isinstance(gm.get_submodule(n.target), (nn.GELU, nn.ReLU))}


def test_fx_and_export_give_the_same_canonical_graph() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2).eval()
    x = _seeded_input(2, 3, 32, 32)
    traced = _canonical(capture(model, x, frontend="fx"))
    exported_gm = capture(model, x, frontend="export", quiet=True)
    assert exported_gm.meta["vitqc"]["frontend"] == "export"
    exported = _canonical(exported_gm)
    assert _layers(exported) == _layers(traced)  # same module paths, nn.Linear / nn.Conv2d / nn.LayerNorm calls
    assert _count_attention(exported) == _count_attention(traced) == (4, 2)
    for gm in (traced, exported):
        assert max_abs_diff(_run(gm, x), _run(model, x)) <= ATOL
        assert not any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)
    # the exported graph keeps a symbolic batch: any batch size runs
    assert max_abs_diff(_run(exported, x[:1]), _run(model, x[:1])) <= ATOL
    owners = {n.meta["vitqc_owner"] for n in exported.graph.nodes if n.op == "call_function" and n.target is operator.matmul}
    assert owners == {"blocks.0.attn", "blocks.1.attn"}


class _ShapeBranch(nn.Module):
    """A block fx cannot trace (Python branches on the input's size) that holds a weight."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 == 0:
            x = x * 2
        return self.fc(x)


def test_auto_falls_back_to_export_in_one_line(capsys) -> None:
    model = nn.Sequential(nn.Linear(8, 8), _ShapeBranch()).eval()
    x = torch.randn(2, 8)
    with pytest.raises(TraceFailure, match="'1'.*_ShapeBranch"):
        capture(model, x, frontend="fx")
    capsys.readouterr()
    gm = capture(model, x)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("capture: Sequential: fx could not trace it: _ShapeBranch at 1")
    assert err[0].endswith("captured with torch.export instead")
    assert gm.meta["vitqc"]["frontend"] == "export" and "fx could not trace" in gm.meta["vitqc"]["frontend_reason"]
    gm = _canonical(gm)
    assert _layers(gm) == {"0": "Linear", "1.fc": "Linear"}
    assert max_abs_diff(_run(gm, x), _run(model, x)) <= ATOL
    capture(model, x, quiet=True)
    assert capsys.readouterr().err == ""


class _HoldsWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


class _NoWeights(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_timm_leaves_that_hold_weights_are_traced_into() -> None:
    from timm.layers import register_notrace_module

    register_notrace_module(_HoldsWeights)
    register_notrace_module(_NoWeights)
    model = nn.Sequential(_HoldsWeights(), _NoWeights()).eval()
    gm = capture(model, torch.randn(2, 8))
    assert gm.meta["vitqc"]["frontend"] == "fx" and gm.meta["vitqc"]["opened_leaves"] == ["0"]
    assert _layers(gm) == {"0.fc": "Linear", "1": "_NoWeights"}  # a leaf without weights stays whole


@torch.fx.wrap
def _apply_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.t()


class _WrappedFunction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply_weight(x, self.proj.weight)


def test_a_wrapped_function_applying_weights_is_exported() -> None:
    model, x = _WrappedFunction().eval(), torch.randn(2, 8)
    with pytest.raises(TraceFailure, match=r"keeps the function _apply_weight\(\) whole.*proj.weight"):
        capture(model, x, frontend="fx")
    gm = _canonical(capture(model, x, quiet=True))
    assert _layers(gm) == {"proj": "Linear"}
    assert max_abs_diff(_run(gm, x), _run(model, x)) <= ATOL


def test_export_needs_an_example_and_a_known_front_end() -> None:
    from vitqc.errors import VitqcError

    with pytest.raises(TraceFailure, match="example input"):
        capture(nn.Linear(2, 2), frontend="export")
    with pytest.raises(VitqcError, match="front end"):
        capture(nn.Linear(2, 2), torch.randn(2, 2), frontend="dynamo")
