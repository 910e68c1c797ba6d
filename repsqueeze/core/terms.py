"""Affine maps in their cheapest grouped-kernel form, and the rules that compose them.

A :class:`Term` is a *per-channel* map (``x -> scale * x + bias``: BatchNorm, ``Identity``,
a depthwise 1x1 conv) or a grouped, dilated *kernel*. Composition works on kernels in their
natural form, never on dense ``C x C`` matrices:

* a per-channel term before or after anything is a broadcast multiply;
* grouped and depthwise kernels stay grouped; a 1x1 kernel before or after a k x k one is
  one ``einsum`` per pair;
* summed terms are added per kernel size first, then each sum is placed into the common
  window with ``F.pad`` (in place, for exact copies).

Two k x k kernels in a row, or mixed groups or dilations, fall back to the dense algebra of
:mod:`repsqueeze.core.algebra`, so every rule stays exact.

Reference: Hu et al., "Online Convolutional Re-parameterization", CVPR 2022 (OREPA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repsqueeze.core import primitives
from repsqueeze.core.algebra import (
    ConvMap,
    Pad,
    bias_through,
    chain,
    dense_kernel,
    grouped,
    parallel,
)
from repsqueeze.core.primitives import Values


@dataclass(frozen=True)
class Term:
    """An affine map built from live parameters, kept in its cheapest form.

    A *per-channel* term (``weight is None``) is ``x -> scale * x + bias`` (``scale`` shaped
    ``(C, 1, *1)``, ``None`` for 1); a *kernel* term is a grouped, dilated convolution on the
    input extended by ``pad``. ``bias`` is ``(C_out,)`` or ``None`` for zero.
    """

    weight: Tensor | None
    scale: Tensor | None
    bias: Tensor | None
    channels: int | None  # output channels, None when the term keeps any count
    groups: int
    stride: tuple[int, ...]
    pad: Pad
    dilation: tuple[int, ...]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def extent(self) -> tuple[int, ...]:
        if self.weight is None:
            return (1,) * len(self.stride)
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel, strict=True))


def per_channel(scale: Tensor | None, bias: Tensor | None, channels: int | None, ndim: int) -> Term:
    """The term ``x -> scale * x + bias`` (``None``: a unit scale, a zero bias)."""
    ones = (1,) * ndim
    return Term(None, scale, bias, channels, 1, ones, ((0, 0),) * ndim, ones)


def is_channel_scale(conv: nn.Module) -> bool:
    """A depthwise 1x1 conv without stride or padding: a per-channel scale (OREPA's)."""
    return (
        conv.groups == conv.in_channels == conv.out_channels
        and all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and not any(map(any, primitives.conv_padding(conv)))
    )


@dataclass(frozen=True)
class Ctx:
    """How terms are built: spatial dimensionality and the values they are built from
    (``live`` for online training, ``exact`` float64 copies for deploy, ``structure`` for
    the layout)."""

    ndim: int
    how: Values


def from_map(m: ConvMap) -> Term:
    """A dense map as a kernel term."""
    ndim = m.ndim
    return Term(m.weight, None, m.bias, m.weight.shape[0], 1, m.stride, m.pad, (1,) * ndim)


def as_kernel(t: Term, channels: int, groups: int, ctx: Ctx) -> Term:
    """A per-channel term as a ``groups``-grouped 1x1 kernel (block-diagonal scales)."""
    if t.weight is not None:
        return t
    scale = t.scale
    if scale is None:
        scale = torch.ones(channels, dtype=ctx.how.dtype, device=ctx.how.device)
    ones = (1,) * ctx.ndim
    if groups == channels:  # depthwise: the scale is the kernel
        weight = scale.reshape(channels, 1, *ones)
    else:  # weight[g * n + a, b] = scale[g * n + a] * (a == b)
        n = channels // groups
        weight = torch.diag_embed(scale.reshape(groups, n)).reshape(channels, n, *ones)
    return replace(t, weight=weight, scale=None, channels=channels, groups=groups)


def to_map(t: Term, c_in: int, ctx: Ctx) -> ConvMap:
    """A term as a dense :class:`ConvMap` (the generic fallback)."""
    t = as_kernel(t, t.channels or c_in, 1, ctx)
    weight = dense_kernel(t.weight, t.groups, t.dilation)
    bias = t.bias if t.bias is not None else weight.new_zeros(weight.shape[0])
    return ConvMap(weight, bias, t.stride, t.pad)


def scale_inputs(w: Tensor, scale: Tensor, groups: int) -> Tensor:
    """``w`` (grouped) followed by a depthwise kernel ``scale`` on its inputs: input channel
    ``i`` multiplied by ``scale[i]``, whose shape is ``(C, 1, *k)`` (``k`` all 1: a scale)."""
    if groups == 1:
        return w * scale.reshape(1, scale.shape[0], *scale.shape[2:])  # (1, C, *k)
    per_group = scale.reshape(groups, 1, w.shape[1], *scale.shape[2:])
    return (grouped(w, groups) * per_group).flatten(0, 1)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def chain_terms(a: Term, b: Term, c_mid: int, ctx: Ctx) -> Term:
    """The term ``x -> b(a(x))``; ``c_mid`` is the number of channels between them."""
    if b.weight is None:  # per-channel after anything
        if b.scale is None:
            return replace(a, bias=_add(a.bias, b.bias), channels=a.channels or b.channels)
        bias = a.bias * b.scale.reshape(-1) if a.bias is not None else None
        if a.weight is None:
            scale = b.scale if a.scale is None else a.scale * b.scale
            return replace(a, scale=scale, bias=_add(bias, b.bias), channels=len(b.scale))
        # exact-mode kernels are fresh copies (see compose.conv_tensors): scaled in place
        weight = a.weight * b.scale if ctx.how.kind == "live" else a.weight.mul_(b.scale)
        return replace(a, weight=weight, bias=_add(bias, b.bias))
    bias = b.bias
    if a.bias is not None:
        bias = _add(bias, bias_through(b.weight, b.groups, a.bias))
    if a.weight is None:  # per-channel before a kernel
        weight = b.weight if a.scale is None else scale_inputs(b.weight, a.scale, b.groups)
        return replace(b, weight=weight, bias=bias)
    stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride, strict=True))
    pad = tuple(
        (pa[0] + sa * pb[0], pa[1] + sa * pb[1])
        for pa, pb, sa in zip(a.pad, b.pad, a.stride, strict=True)
    )
    depthwise_a = a.groups == c_mid == a.weight.shape[0] and a.weight.shape[1] == 1
    depthwise_b = b.groups == c_mid == b.weight.shape[0]
    weight = groups = dilation = None
    if all(k == 1 for k in b.kernel):  # a k x k, then a pointwise b: one einsum
        dilation = a.dilation
        if a.groups == b.groups:
            groups = a.groups
            weight = torch.einsum(
                "gom,gmi...->goi...", grouped(b.weight, groups).flatten(2),
                grouped(a.weight, groups),
            ).flatten(0, 1)  # fmt: skip
        elif depthwise_b:
            groups, weight = a.groups, a.weight * b.weight
        elif depthwise_a:
            groups, weight = b.groups, scale_inputs(b.weight, a.weight, b.groups)
    elif all(k == 1 for k in a.kernel):  # a pointwise a, then a k x k b
        dilation = tuple(d * s for d, s in zip(b.dilation, a.stride, strict=True))
        if a.groups == b.groups:
            groups = a.groups
            weight = torch.einsum(
                "gom...,gmi->goi...", grouped(b.weight, groups),
                grouped(a.weight, groups).flatten(2),
            ).flatten(0, 1)  # fmt: skip
        elif depthwise_b:
            groups, weight = a.groups, b.weight * a.weight
        elif depthwise_a:
            groups, weight = b.groups, scale_inputs(b.weight, a.weight, b.groups)
    if weight is None:  # two k x k kernels or mixed groups: the dense algebra
        m = chain(to_map(a, 0, ctx), to_map(b, c_mid, ctx))
        return from_map(ConvMap(m.weight, m.bias, m.stride, m.pad))
    return Term(weight, None, bias, b.channels, groups, stride, pad, dilation)


def sum_terms(terms: list[Term], channels: int, ctx: Ctx) -> Term:
    """The term ``x -> sum_i terms[i](x)`` (branches already checked to be aligned)."""
    ndim = ctx.ndim
    bias = None
    for t in terms:
        bias = _add(bias, t.bias)
    kernels = [t for t in terms if t.weight is not None]
    if not kernels:  # per-channel branches only
        scales = [t.scale if t.scale is not None else 1.0 for t in terms]
        scale = scales[0]
        for s in scales[1:]:
            scale = scale + s
        if not isinstance(scale, Tensor):
            scale = torch.full(
                (channels, *(1,) * (ndim + 1)), scale, dtype=ctx.how.dtype, device=ctx.how.device
            )
        return per_channel(scale, bias, channels, ndim)
    pad = tuple(
        (max(t.pad[d][0] for t in terms), max(t.pad[d][1] for t in terms)) for d in range(ndim)
    )
    slack = tuple(l + r - e for (l, r), e in zip(terms[0].pad, terms[0].extent, strict=True))
    extent = tuple(l + r - s for (l, r), s in zip(pad, slack, strict=True))
    groups = math.gcd(*(t.groups for t in kernels))
    offsets = [tuple(p[0] - q[0] for p, q in zip(pad, t.pad, strict=True)) for t in terms]
    dilation = []
    for d in range(ndim):
        used = [t.dilation[d] for t in kernels if t.kernel[d] > 1]
        dilation.append(math.gcd(*used, *(o[d] for o in offsets), extent[d] - 1) or 1)
    fast = all(t.groups == groups for t in kernels) and all(
        t.kernel[d] == 1 or t.dilation[d] == dilation[d] for t in kernels for d in range(ndim)
    )
    if not fast:  # mixed groups or dilations: the dense algebra
        m = parallel([to_map(t, channels, ctx) for t in terms])
        return from_map(m)
    size = tuple((e - 1) // dil + 1 for e, dil in zip(extent, dilation, strict=True))
    starts = [tuple(o // dil for o, dil in zip(off, dilation, strict=True)) for off in offsets]
    if ctx.how.kind != "live":
        weight = _sum_in_place(terms, starts, size, channels, groups, ctx)
        return Term(weight, None, bias, channels, groups, terms[0].stride, pad, tuple(dilation))
    # out of place, for autograd and torch.compile: sum the kernels of one size and place
    # first, then pad each sum once into the window
    placed: dict[tuple, Tensor] = {}
    for t, start in zip(terms, starts, strict=True):
        w = as_kernel(t, channels, groups, ctx).weight
        key = (tuple(w.shape[2:]), start)
        placed[key] = w if key not in placed else placed[key] + w
    weight = None
    for (kernel, start), w in placed.items():
        widths = []
        for k, s, n in zip(reversed(kernel), reversed(start), reversed(size), strict=True):
            widths += [s, n - s - k]
        w = F.pad(w, widths) if any(widths) else w
        weight = w if weight is None else weight + w
    return Term(weight, None, bias, channels, groups, terms[0].stride, pad, tuple(dilation))


def _sum_in_place(
    terms: list[Term],
    starts: list[tuple[int, ...]],
    size: tuple[int, ...],
    channels: int,
    groups: int,
    ctx: Ctx,
) -> Tensor:
    """The kernels of aligned terms summed in place into one ``groups``-grouped kernel of
    ``size`` (each at its start), per-channel terms added onto its diagonal: no dense
    diagonal, no padded copies. Only for exact mode, whose kernels are fresh copies (see
    :func:`repsqueeze.core.compose.conv_tensors`), never the parameters themselves."""
    kernels = [(t.weight, s) for t, s in zip(terms, starts, strict=True) if t.weight is not None]
    weight = next((w for w, s in kernels if tuple(w.shape[2:]) == size), None)
    if weight is not None and not weight.is_contiguous():  # (viewed per group below)
        weight = weight.contiguous()
    if weight is None:
        shape = (*kernels[0][0].shape[:2], *size)
        weight = torch.zeros(shape, dtype=ctx.how.dtype, device=ctx.how.device)
    first = next((w for w, s in kernels if tuple(w.shape[2:]) == size), None)
    for w, start in kernels:
        if w is not first:
            where = tuple(slice(s, s + k) for s, k in zip(start, w.shape[2:], strict=True))
            weight[(slice(None), slice(None), *where)] += w
    n = channels // groups
    for t, start in zip(terms, starts, strict=True):
        if t.weight is None:  # x -> scale * x: the diagonal of each group's block, one tap
            taps = weight.view(groups, n, n, *size)[(slice(None), slice(None), slice(None), *start)]
            diagonal = torch.diagonal(taps, dim1=1, dim2=2)  # (groups, n), a view
            diagonal += 1.0 if t.scale is None else t.scale.reshape(groups, n)
    return weight
