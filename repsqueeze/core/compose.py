"""The online terms of a block tree: one walk builds a node's :class:`~repsqueeze.core.terms.Term`.

Chains compose their parts' terms in order, sums add them
(:mod:`repsqueeze.core.terms`' fast rules); concatenations and deployed blocks take the dense
map of :mod:`repsqueeze.core.maps`. The same walk builds the structural layout of a block
(indicator weights), its exact composite for deploy (detached float64 copies) and its live
kernel for online training (the parameters, autograd kept).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import geometry, maps, primitives, tree
from repsqueeze.core.algebra import Layout, grouped_layout
from repsqueeze.core.primitives import STRUCTURE, Values
from repsqueeze.core.terms import (
    Ctx,
    Term,
    as_kernel,
    chain_terms,
    from_map,
    is_channel_scale,
    per_channel,
    sum_terms,
    to_map,
)
from repsqueeze.core.tree import Combinator, join


def term_of(node: nn.Module, c_in: int, path: str, ctx: Ctx) -> Term:
    """The term of a node (a block, an ``nn.Sequential`` or one layer) on ``c_in`` channels."""
    return tree.visit(node, _TERMS, c_in, path, ctx)


def chain_of(parts: list[tuple[str, nn.Module]], c_in: int, path: str, ctx: Ctx) -> Term:
    """The term of named parts run in order."""
    total = None
    for name, child in parts:
        t = term_of(child, c_in, join(path, name), ctx)
        total = t if total is None else chain_terms(total, t, c_in, ctx)
        c_in = t.channels or c_in
    return total


def head_term(block: Combinator, head: int, c_in: int, ctx: Ctx) -> Term:
    """The term of the block's first ``head`` parts (all of them: the block's own term)."""
    parts = block.named_parts()
    if head == len(parts):
        return term_of(block, c_in, "", ctx)
    return chain_of(parts[:head], c_in, "", ctx)


class _Terms:
    def layer(self, m: nn.Module, c_in: int, path: str, ctx: Ctx) -> Term:
        ndim = ctx.ndim
        if isinstance(m, primitives.CONVS):
            weight, bias = conv_tensors(m, path, ctx.how)
            if is_channel_scale(m):
                return per_channel(weight, bias, m.out_channels, ndim)
            pad = primitives.conv_padding(m)
            return Term(
                weight, None, bias, m.out_channels, m.groups, tuple(m.stride), pad,
                tuple(m.dilation),
            )  # fmt: skip
        if isinstance(m, _BatchNorm):
            if ctx.how.kind == "structure":  # the pattern of a per-channel map: a unit scale
                return per_channel(None, None, m.num_features, ndim)
            scale, shift = primitives.bn_affine(m, path, ctx.how)
            return per_channel(scale.reshape(-1, *(1,) * (ndim + 1)), shift, len(scale), ndim)
        if isinstance(m, nn.Identity):
            return per_channel(None, None, None, ndim)
        if isinstance(m, primitives.POOLS):
            geo = primitives.geometry(m, ndim, path)
            divisor = getattr(m, "divisor_override", None) or math.prod(geo.extent)
            kw = {"dtype": ctx.how.dtype, "device": ctx.how.device}
            weight = torch.full((c_in, 1, *geo.extent), 1.0 / divisor, **kw)
            return Term(weight, None, None, c_in, c_in, geo.stride, geo.pad, (1,) * ndim)
        return self.deployed(m, c_in, path, ctx)  # raises the TypeError naming the layer

    def deployed(self, m: nn.Module, c_in: int, path: str, ctx: Ctx) -> Term:
        return from_map(maps.map_of(m, c_in, ctx.ndim, path, ctx.how))  # dense

    def chain(self, m: nn.Module, c_in: int, path: str, ctx: Ctx) -> Term:
        return chain_of(tree.parts(m), c_in, path, ctx)

    def sum(self, m: Combinator, c_in: int, path: str, ctx: Ctx) -> Term:
        terms = [term_of(p, c_in, join(path, n), ctx) for n, p in m.named_parts()]
        return sum_terms(terms, geometry.geometry_of(m, ctx.ndim).c_out or c_in, ctx)

    concat = split = deployed


_TERMS = _Terms()


def conv_tensors(conv: nn.Module, path: str, how: Values) -> tuple[Tensor, Tensor | None]:
    """A conv's ``(weight, bias)`` as ``how`` says: the parameters (``live``), detached
    ``how.dtype`` copies (``exact``) or indicator ones and no bias (``structure``)."""
    if how.kind == "live":
        return conv.weight, conv.bias
    kw = {"dtype": how.dtype, "device": how.device}
    if how.kind == "structure":
        return torch.ones(conv.weight.shape, **kw), None
    # copies (even when already float64): the exact algebra may then add into them in place
    weight = primitives.value_of(conv, path, "weight", how).to(**kw, copy=True)
    bias = conv.bias
    bias = primitives.value_of(conv, path, "bias", how).to(**kw) if bias is not None else None
    return weight, bias


def layout_of(block: Combinator, ndim: int, head: int) -> Layout:
    """The layout of a block's first ``head`` parts, composed with indicator weights."""
    ctx, c_in = Ctx(ndim, STRUCTURE), geometry.in_channels(block)
    return term_layout(head_term(block, head, c_in, ctx), c_in, ctx)


def exact_composite(block: Combinator, lay: Layout, how: Values) -> tuple[Tensor, Tensor | None]:
    """The block's ``(weight, bias)`` in the layout ``lay``, from its tensors as ``how`` says
    (``exact``: detached float64 copies)."""
    ctx, c_in = Ctx(geometry.require_ndim(block), how), geometry.in_channels(block)
    return pack(term_of(block, c_in, "", ctx), lay, c_in, ctx)


def term_layout(t: Term, c_in: int, ctx: Ctx) -> Layout:
    """The layout of a structural term (indicator weights), read from its grouped form."""
    channels = t.channels or c_in
    t = as_kernel(t, channels, channels, ctx)  # a per-channel map is depthwise
    return grouped_layout(t.weight, t.groups, t.dilation, t.stride, t.pad)


def pack(t: Term, lay: Layout, c_in: int, ctx: Ctx) -> tuple[Tensor, Tensor | None]:
    """The ``(weight, bias)`` of the planned convolution from the block's term."""
    t = as_kernel(t, t.channels or c_in, lay.groups, ctx)
    widths = []
    for d in reversed(range(ctx.ndim)):
        offset = lay.padding[d] - t.pad[d][0]
        if t.kernel[d] > 1 and t.dilation[d] != lay.dilation[d] or offset % lay.dilation[d]:
            widths = None
            break
        front = offset // lay.dilation[d]
        widths += [front, lay.kernel_size[d] - t.kernel[d] - front]
    if t.groups != lay.groups or widths is None or min(widths) < 0:
        return lay.pack(to_map(t, c_in, ctx))  # the layout regroups or re-dilates
    return (F.pad(t.weight, widths) if any(widths) else t.weight), t.bias
