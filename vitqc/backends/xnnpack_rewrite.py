"""Graph rewrites that let XNNPACK take a whole ViT: ops it has no kernel for, restated in ops it has.

An exported ATen graph of a ViT holds ops XNNPACK cannot delegate (``layer_norm``, ``matmul`` with batch dims,
``unbind``, ``round`` ...). Each one left outside splits the delegate around a portable kernel, and each split
costs dim-order copies. :func:`xnnpack_supported_ops` rewrites them in place, before PT2E annotation.
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from vitqc.quant.pairwise_layer_norm import pairwise_sum_nodes
from vitqc.quant.rational_gelu import replace_rational_gelus

__all__ = ["xnnpack_supported_ops", "rational_gelus_to_kernel", "pairwise_sums_transposed", "is_to_dtype",
           "is_sqrt_rn", "SQRT_OUTSIDE_XNNPACK"]


ROUND_MAGIC = 1.5 * 2.0**23  # x + this rounds x to an integer (ties to even) for |x| < 2^22


def xnnpack_supported_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ops XNNPACK does not take (in an exported ATen graph) into ones it does, so they run inside the
    delegate instead of splitting it around portable kernels (each split costs dim-order copies; LayerNorm and
    attention's batched matmuls alone cut a ViT-S into 62 segments). Same values, except where noted:

    * ``layer_norm`` over the last dim -> mean / sub / mul / rsqrt on x viewed as [rows, 1, 1, C] (XNNPACK's
      mean is a global average pooling of 4-D tensors). Float rounding differs from the fused kernel.
    * ``matmul`` of two tensors with the same batch dims -> ``bmm`` on [batch, N, K] views (matmul's own
      decomposition expands both operands first, and XNNPACK has no expand). Exact.
    * ``unbind`` / ``select`` (qkv split, class token) -> ``slice`` + ``reshape``; ``expand`` or ``slice`` to the
      input's own shape is dropped. Exact.
    * vitqc's quantizers: ``amax(x, -1, keepdim)`` -> ``max.dim`` over the last dim of ``x`` viewed as
      [1, rows, 1, C] (a max pooling with the rows as channels, which XNNPACK's pooling kernels run side by side;
      as [1, 1, rows, C], one channel, it took 40x as long); ``amin(x)`` -> ``-max(-x)``. Exact.
    * ``round(x)`` -> ``(x + 1.5 * 2^23) - 1.5 * 2^23``: XNNPACK has no round; float32 addition rounds to nearest,
      ties to even, at the magnitude where a float32's last bit is 1, so this is ``round`` (half to even) bit for
      bit for |x| < 2^22 (beyond, the codes are clamped anyway). ``floor(x + 0.5)`` would round ties up: ties are
      rare but not negligible in trained models (a joint-w8a8 vit_tiny_cifar10 program: 1.2 % of argmaxes moved).
    * ``clamp_min(x, lo)`` -> ``clamp(x, lo)``; ``detach`` and ``alias`` are dropped. Exact.
    * vitqc's GELU (:func:`vitqc.quant.rational_gelu.rational_gelu`, some twenty ops) -> ``gelu``: XNNPACK's GELU
      kernel is that formula. Exact.
    * ``to(sqrt(to(x, float64)), float32)`` (:func:`vitqc.quant.pairwise_layer_norm.sqrt_rn`) -> ``sqrt(x)``,
      which :data:`SQRT_OUTSIDE_XNNPACK` keeps on ExecuTorch's portable kernel: both correctly rounded. Exact.
    * vitqc's row sums (:func:`vitqc.quant.pairwise_layer_norm.pairwise_sum`) on the rows transposed
      (:func:`pairwise_sums_transposed`). Exact.
    """
    aten = torch.ops.aten
    g = gm.graph
    rational_gelus_to_kernel(g)
    pairwise_sums_transposed(g)

    def call(target, *args) -> fx.Node:
        return g.call_function(target, args)

    def row_max(x: fx.Node, shape: list[int]) -> fx.Node:
        x4 = call(aten.reshape.default, x, [1, math.prod(shape[:-1]), 1, shape[-1]])
        m = call(operator.getitem, call(aten.max.dim, x4, 3, True), 0)
        return call(aten.reshape.default, m, list(shape[:-1]) + [1])

    def layer_norm(x: fx.Node, shape: list[int], weight, bias, eps: float) -> fx.Node:
        x4 = call(aten.reshape.default, x, [math.prod(shape[:-1]), 1, 1, shape[-1]])
        d = call(aten.sub.Tensor, x4, call(aten.mean.dim, x4, [2, 3], True))
        var = call(aten.mean.dim, call(aten.mul.Tensor, d, d), [2, 3], True)
        y = call(aten.mul.Tensor, d, call(aten.rsqrt.default, call(aten.add.Tensor, var, eps)))
        y = y if weight is None else call(aten.mul.Tensor, y, weight)
        y = y if bias is None else call(aten.add.Tensor, y, bias)
        return call(aten.reshape.default, y, shape)

    def take(x: fx.Node, shape: list[int], dim: int, i: int) -> fx.Node:
        i %= shape[dim]
        return call(aten.reshape.default, call(aten.slice.Tensor, x, dim, i, i + 1), shape[:dim] + shape[dim + 1:])

    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        val = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
        shape = list(val.shape) if val is not None else None
        with g.inserting_before(node):
            if node.target in (aten.amax.default, aten.amin.default) and val is not None:
                dims = [d % val.dim() for d in node.args[1]]
                keep = len(node.args) > 2 and node.args[2]
                if dims != [val.dim() - 1] or not keep:
                    continue
                if node.target is aten.amax.default:
                    new = row_max(node.args[0], shape)
                else:
                    new = call(aten.neg.default, row_max(call(aten.neg.default, node.args[0]), shape))
            elif node.target is aten.layer_norm.default and val is not None and len(node.args[1]) == 1:
                args = list(node.args) + [None] * (5 - len(node.args))
                new = layer_norm(node.args[0], shape, args[2], args[3], 1e-5 if args[4] is None else args[4])
            elif node.target is aten.matmul.default and val is not None:
                other = node.args[1].meta.get("val")
                if other is None or val.dim() < 3 or val.shape[:-2] != other.shape[:-2]:
                    continue
                batch = math.prod(shape[:-2])
                a = call(aten.reshape.default, node.args[0], [batch] + shape[-2:])
                b = call(aten.reshape.default, node.args[1], [batch] + list(other.shape[-2:]))
                new = call(aten.reshape.default, call(aten.bmm.default, a, b), shape[:-1] + [int(other.shape[-1])])
            elif node.target is aten.select.int and val is not None:
                new = take(node.args[0], shape, node.args[1] % len(shape), node.args[2])
            elif node.target is aten.unbind.int and val is not None:
                dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
                getters = list(node.users)
                if not all(u.target is operator.getitem for u in getters):
                    continue
                for u in getters:
                    with g.inserting_before(u):
                        part = take(node.args[0], shape, dim, u.args[1])
                    part.meta["val"] = u.meta.get("val")
                    u.replace_all_uses_with(part)
                    g.erase_node(u)
                g.erase_node(node)
                continue
            elif node.target in (aten.expand.default, aten.slice.Tensor) and val is not None \
                    and list(node.meta["val"].shape) == shape:
                new = node.args[0]  # expanding or slicing to its own shape (the class token at batch 1, patches)
            elif node.target is aten.round.default:
                new = call(aten.sub.Tensor, call(aten.add.Tensor, node.args[0], ROUND_MAGIC), ROUND_MAGIC)
            elif node.target is aten.clamp_min.default:
                new = call(aten.clamp.default, node.args[0], node.args[1])
            elif is_sqrt_rn(node):
                new = call(aten.sqrt.default, node.args[0].args[0].args[0])  # the float64 ops die below
                for inner in (node.args[0], node.args[0].args[0]):  # with their dtype asserts
                    for user in [u for u in inner.users if u.target is aten._assert_tensor_metadata.default]:
                        g.erase_node(user)
            elif node.target in (aten.detach.default, aten.alias.default):
                new = node.args[0]
            else:
                continue
        if isinstance(new, fx.Node) and new is not node.args[0]:
            new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm


def is_to_dtype(node: object, dtype: torch.dtype) -> bool:
    """``node`` converts a float32 tensor to ``dtype`` (``aten.to.dtype`` / ``_to_copy`` with that dtype only)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    aten = torch.ops.aten
    if node.target is aten.to.dtype:
        return len(node.args) >= 2 and node.args[1] == dtype and not node.kwargs
    if node.target is aten._to_copy.default:
        return set(node.kwargs) == {"dtype"} and node.kwargs["dtype"] == dtype
    return False


def is_sqrt_rn(node: fx.Node) -> bool:
    """``node`` is the end of an exported :func:`~vitqc.quant.pairwise_layer_norm.sqrt_rn`:
    ``to(sqrt(to(x, float64)), float32)``."""
    inner = node.args[0] if node.args else None
    return is_to_dtype(node, torch.float32) and isinstance(inner, fx.Node) \
        and inner.target is torch.ops.aten.sqrt.default and is_to_dtype(inner.args[0], torch.float64)


# XNNPACK's x86 square root is not correctly rounded (rsqrt-based); ExecuTorch's portable kernel is. A square root
# is one value per LayerNorm row, so leaving it outside the delegate costs little (a split of the delegate).
SQRT_OUTSIDE_XNNPACK = ("SquareRootConfig",)


def rational_gelus_to_kernel(g: fx.Graph) -> int:
    """Each vitqc GELU (:func:`~vitqc.quant.rational_gelu.rational_gelu`, exported) as one ``aten.gelu`` node."""
    return replace_rational_gelus(g, torch.ops.aten.gelu.default)


# pairwise sums halve along the last dim while halves are this wide, then go on transposed (pte_layer_norm.json)
TRANSPOSE_AT_WIDTH = 64


def pairwise_sums_transposed(g: fx.Graph) -> int:
    """Each exported :func:`~vitqc.quant.pairwise_layer_norm.pairwise_sum` of ``x`` [..., C] restated: halves
    along the last dim while they are at least :data:`TRANSPOSE_AT_WIDTH` wide (long contiguous pieces), then the
    rest on the rows transposed, [width, R], where each half is a contiguous block of rows and each addition runs
    along R. The same additions of the same pairs, so the same values. Sliced along the last dim to the end, the
    narrow levels copy short strided pieces, down to one column per row for the odd rest
    (benchmarks/results/pte_layer_norm.json)."""
    aten = torch.ops.aten

    def call(target, *args) -> fx.Node:
        return g.call_function(target, args)

    def halves(t: fx.Node, dim: int, n: int) -> fx.Node:
        return call(aten.add.Tensor, call(aten.slice.Tensor, t, dim, 0, n), call(aten.slice.Tensor, t, dim, n, 2 * n))

    found = pairwise_sum_nodes(g)
    for src, out in found:
        shape = list(src.meta["val"].shape)
        rows, n = math.prod(shape[:-1]), shape[-1]
        with g.inserting_before(out):
            t = call(aten.reshape.default, src, [rows, n])
            while n % 2 == 0 and n // 2 >= TRANSPOSE_AT_WIDTH:
                n //= 2
                t = halves(t, 1, n)
            t = call(aten.permute.default, t, [1, 0])
            while n > 1 and n % 2 == 0:
                n //= 2
                t = halves(t, 0, n)
            total = t if n == 1 else call(aten.slice.Tensor, t, 0, 0, 1)
            for i in range(1, n):
                total = call(aten.add.Tensor, total, call(aten.slice.Tensor, t, 0, i, i + 1))
            new = call(aten.reshape.default, total, shape[:-1] + [1])
        new.meta["val"] = out.meta.get("val")
        out.replace_all_uses_with(new)
    if found:
        g.eliminate_dead_code()
    return len(found)
