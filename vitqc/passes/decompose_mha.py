"""``decompose_mha``: open every ``nn.MultiheadAttention`` call into Linear modules and explicit attention.

For an MHA module at path ``P`` the pass replaces the module by a :class:`DecomposedMultiheadAttention`
container at the same path (so ``P`` stays a valid owner path and parameters are not duplicated) holding
plain ``nn.Linear`` submodules:

* ``P.in_proj`` (E -> 3E): packed weights and self-attention (query, key and value are the same node);
* ``P.q_proj`` / ``P.k_proj`` / ``P.v_proj``: separate weights (``kdim``/``vdim``) or cross-attention;
* ``P.out_proj``: the MHA's out_proj as a plain ``nn.Linear`` (same Parameters).

Each call becomes (batch-first internally; ``batch_first=False`` inputs are transposed in and out)::

    n = x.size(0)
    qkv = P.in_proj(x).reshape(n, -1, 3, H, D).permute(2, 0, 3, 1, 4); q, k, v = qkv.unbind(0)  # packed
    q = P.q_proj(x).reshape(n, -1, H, D).transpose(1, 2)                                        # separate
    scores = operator.matmul(operator.mul(q, 1/sqrt(D)), k.transpose(-2, -1))
    scores = operator.add(scores, mha_attention_bias(scores, attn_mask, key_padding_mask))  # masks only
    attn = scores.softmax(dim=-1)
    out = P.out_proj(operator.matmul(attn, v).transpose(1, 2).reshape(n, -1, E))

i.e. the same canonical op forms as ``decompose_sdpa`` (``operator.mul`` by a float, call_method ``transpose``,
``operator.matmul``, call_method ``softmax`` with ``dim=-1``, ``operator.matmul``). Uses of the result must be
``getitem 0`` (output) / ``getitem 1`` (attention weights, averaged over heads unless
``average_attn_weights=False``). Attention dropout is ignored (inference). ``is_causal`` is only a hint in MHA
(it requires ``attn_mask``), so the mask is what is applied. Not supported (a one-line error):
``add_bias_kv``, ``add_zero_attn``, unbatched (2-D) inputs when shapes are known, non-constant flags.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any

import torch
from torch import fx, nn

from vitqc.graph import NodeEmitter, finish_graph, static_tensor_meta
from vitqc.errors import VitqcError
from vitqc.passes.base import CompileContext, NoOptions, PassResult, VitqcPass, register_pass

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


class DecomposedMultiheadAttention(nn.Module):
    """What is left of an ``nn.MultiheadAttention`` after ``decompose_mha``: a container of its Linear layers."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first = mha.batch_first

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
        raise RuntimeError("DecomposedMultiheadAttention is a container; the graph calls its Linear layers")


def _float_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


@torch.fx.wrap
def mha_attention_bias(scores: torch.Tensor, attn_mask: torch.Tensor | None,
                       key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """MHA's ``attn_mask`` / ``key_padding_mask`` (bool: True = masked out; float: added) as one additive bias
    broadcastable to ``scores`` (N, H, L, S)."""
    n, h, length, source = scores.shape
    bias: torch.Tensor | None = None
    if attn_mask is not None:
        bias = _float_bias(attn_mask, scores.dtype)
        if bias.dim() == 3:
            bias = bias.view(n, h, length, source)
    if key_padding_mask is not None:
        pad = _float_bias(key_padding_mask, scores.dtype).view(n, 1, 1, source)
        bias = pad if bias is None else bias + pad
    if bias is None:
        return torch.zeros((), dtype=scores.dtype, device=scores.device)
    return bias


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    lin.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight.detach().clone())
    if bias is not None:
        lin.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
    return lin


class _Decomposer:
    def __init__(self, gm: fx.GraphModule, path: str, mha: nn.MultiheadAttention) -> None:
        self.gm, self.path, self.mha = gm, path, mha
        if mha.bias_k is not None or mha.bias_v is not None:
            raise VitqcError(f"decompose_mha: {path or 'the model'} uses add_bias_kv, which is not supported")
        if mha.add_zero_attn:
            raise VitqcError(f"decompose_mha: {path or 'the model'} uses add_zero_attn, which is not supported")
        self.container = DecomposedMultiheadAttention(mha)
        self.made: set[str] = set()
        self.install()

    def linear(self, name: str) -> str:
        """Create (once) the Linear ``name`` in the container; return its qualified path."""
        if name not in self.made:
            m, e = self.mha, self.mha.embed_dim
            b = m.in_proj_bias
            if name == "out_proj":
                lin = _plain_linear(m.out_proj.weight, m.out_proj.bias)
            elif name == "in_proj":
                lin = _plain_linear(m.in_proj_weight, b)
            else:
                i = "qkv".index(name[0])
                if m._qkv_same_embed_dim:
                    weight: torch.Tensor = m.in_proj_weight[i * e:(i + 1) * e]
                else:
                    weight = getattr(m, f"{name[0]}_proj_weight")
                lin = _plain_linear(weight, None if b is None else b[i * e:(i + 1) * e])
            self.container.add_module(name, lin)  # the container is already in the GraphModule
            self.made.add(name)
        return f"{self.path}.{name}" if self.path else name

    def decompose(self, node: fx.Node) -> None:
        m = self.mha
        try:
            bound = _MHA_SIGNATURE.bind(None, *node.args, **node.kwargs)
        except TypeError as e:
            raise VitqcError(f"decompose_mha: cannot read the arguments of node {node.name}: {e}") from None
        bound.apply_defaults()
        a = dict(bound.arguments)
        for flag in ("need_weights", "average_attn_weights", "is_causal"):
            if isinstance(a[flag], fx.Node):
                raise VitqcError(f"decompose_mha: node {node.name} passes {flag} as a tensor; it must be a constant")
        for name in ("query", "key", "value"):
            meta = static_tensor_meta(a[name])
            if meta is not None and len(meta.shape) != 3:
                raise VitqcError(f"decompose_mha: node {node.name} has {len(meta.shape)}-D {name}; only batched "
                                 f"(3-D) inputs are supported")
        for user in list(node.users):  # `out, _ = mha(...)`: an unused getitem is no use of the weights
            if user.op == "call_function" and user.target is operator.getitem and not user.users:
                self.gm.graph.erase_node(user)
        users = list(node.users)
        for user in users:
            if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
                raise VitqcError(f"decompose_mha: the result of {node.name} is used by {user.name} other than as "
                                 f"out[0] / out[1]; only those uses are supported")
        want_weights = any(u.args[1] == 1 for u in users)
        if want_weights and not a["need_weights"]:
            raise VitqcError(f"decompose_mha: {node.name} is called with need_weights=False but its weights are used")

        emit = NodeEmitter(self.gm.graph, node, owner=self.path, owner_type=type(m))
        e, h, d = m.embed_dim, m.num_heads, m.head_dim

        cache: dict[fx.Node, Any] = {}

        def batch_first(x: Any) -> Any:
            if m.batch_first:
                return x
            if x not in cache:
                cache[x] = emit.method("transpose", x, 0, 1)
            return cache[x]

        query, key, value = a["query"], a["key"], a["value"]
        qb = batch_first(query)
        n = emit.method("size", qb, 0)
        if m._qkv_same_embed_dim and query is key and key is value:
            qkv = emit.module(self.linear("in_proj"), qb)
            qkv = emit.method("reshape", qkv, n, -1, 3, h, d)
            qkv = emit.method("permute", qkv, 2, 0, 3, 1, 4)
            parts = emit.method("unbind", qkv, 0)
            q, k, v = (emit.function(operator.getitem, parts, i) for i in range(3))
        else:
            def project(name: str, x: Any) -> fx.Node:
                y = emit.module(self.linear(name), batch_first(x))
                y = emit.method("reshape", y, n, -1, h, d)
                return emit.method("transpose", y, 1, 2)

            q, k, v = project("q_proj", query), project("k_proj", key), project("v_proj", value)

        q_scaled = emit.function(operator.mul, q, 1.0 / math.sqrt(d))
        k_t = emit.method("transpose", k, -2, -1)
        scores = emit.function(operator.matmul, q_scaled, k_t)
        if a["attn_mask"] is not None or a["key_padding_mask"] is not None:
            bias = emit.function(mha_attention_bias, scores, a["attn_mask"], a["key_padding_mask"])
            scores = emit.function(operator.add, scores, bias)
        attn = emit.method("softmax", scores, dim=-1)
        out = emit.function(operator.matmul, attn, v)
        out = emit.method("transpose", out, 1, 2)
        out = emit.method("reshape", out, n, -1, e)
        out = emit.module(self.linear("out_proj"), out)
        if not m.batch_first:
            out = emit.method("transpose", out, 0, 1)
        weights = None
        if want_weights:
            weights = emit.method("mean", attn, dim=1) if a["average_attn_weights"] else attn

        for user in users:
            replacement = out if user.args[1] == 0 else weights
            assert replacement is not None
            if "tensor_meta" in user.meta:
                replacement.meta.setdefault("tensor_meta", user.meta["tensor_meta"])
            user.replace_all_uses_with(replacement)
            self.gm.graph.erase_node(user)
        self.gm.graph.erase_node(node)

    def install(self) -> None:
        """Put the container (with its Linear layers) at the MHA's path, keeping other referenced attributes."""
        prefix = f"{self.path}." if self.path else ""
        for n in self.gm.graph.nodes:
            if n.op == "get_attr" and str(n.target).startswith(prefix):
                attr = str(n.target)[len(prefix):].split(".")[0]
                if not hasattr(self.container, attr):
                    value = getattr(self.mha, attr)
                    if isinstance(value, nn.Module):
                        self.container.add_module(attr, value)
                    elif isinstance(value, nn.Parameter):
                        self.container.register_parameter(attr, value)
                    elif isinstance(value, torch.Tensor):
                        self.container.register_buffer(attr, value)
                    else:
                        setattr(self.container, attr, value)
        if not self.path:  # pragma: no cover - the root of a GraphModule is never an MHA
            return
        parent_path, _, name = self.path.rpartition(".")
        parent = self.gm.get_submodule(parent_path) if parent_path else self.gm
        setattr(parent, name, self.container)


@register_pass
class DecomposeMha(VitqcPass):
    name = "decompose_mha"
    summary = "replace nn.MultiheadAttention calls with Linear modules and explicit matmul/softmax attention"
    Options = NoOptions
    requires = ()
    ensures = ("no_multihead_attention_modules",)

    def call(self, graph_module: fx.GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        decomposers: dict[str, _Decomposer] = {}
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            path = str(node.target)
            if path not in decomposers:
                mod = gm.get_submodule(path)
                if not isinstance(mod, nn.MultiheadAttention):
                    continue
                decomposers[path] = _Decomposer(gm, path, mod)  # puts its container at `path`
            decomposers[path].decompose(node)
        if decomposers:
            finish_graph(gm)
        return PassResult(gm, bool(decomposers))


__all__ = ["DecomposeMha", "DecomposedMultiheadAttention", "mha_attention_bias"]
