"""Online squeezing: compose a block's exact kernel inside the forward pass, run one conv.

``mode="online"`` builds the block's kernel and bias from its parameters in every forward
pass (autograd flows through the composition) and runs a single convolution; trailing
BatchNorms of a chain run after it, on the convolution's output, with batch statistics.
The composition works on kernels in their natural form, never on dense ``C x C`` matrices:

* BatchNorm (folded with running statistics), ``Identity`` and channel scales (depthwise
  1x1 convs) are per-channel scales, applied by a broadcast multiply;
* grouped and depthwise kernels stay grouped; a 1x1 conv before or after a k x k conv is one
  ``einsum`` per pair; average pooling is a constant depthwise kernel;
* parallel branches are summed per kernel size first, then each sum is placed into the
  common window with ``F.pad``.

Anything the fast rules do not cover (two k x k convs in a row, mixed groups, a
:class:`~repsqueeze.core.blocks.Squeezable` subclass with its own combination) falls back to the
exact dense algebra of :mod:`repsqueeze.core.algebra`, so online mode stays exact for every block.
The structural part (how many children are composed, the layout of the resulting conv) is a
:class:`Plan`, computed once per block and spatial dimensionality outside the forward pass
and rebuilt when a child module is replaced. The forward pass has no host-device
synchronisation and no Python control flow on tensor values, so ``torch.compile(...,
fullgraph=True)`` traces it.

``mode="auto"`` times both forms on the first batch of each (input shape, dtype, device,
training) and keeps the faster one per block; under ``torch.compile`` it never times (it uses
a decision already taken, else the multiply-accumulate model :func:`macs`).

Reference: Hu et al., "Online Convolutional Re-parameterization", CVPR 2022 (OREPA).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import blocks, primitives
from repsqueeze.core.algebra import (
    ConvMap,
    Layout,
    Pad,
    chain,
    dense_kernel,
    grouped_layout,
    parallel,
)
from repsqueeze.core.primitives import STRUCTURE, Geometry, Precision

MODES = ("chain", "online", "auto")
AUTO_REPEATS = 3  # timed runs of each form per decision of mode="auto"


# --- the structural plan -----------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What online mode needs to know about a block's structure, computed once.

    Attributes:
        fingerprint: identities of the block's modules when the plan was made; a replaced
            child changes it and the plan is rebuilt.
        head: how many children are composed into the kernel; the rest (trailing
            BatchNorms) run after the convolution.
        layout: the composed convolution (kernel size, groups, dilation, padding).
    """

    fingerprint: tuple[int, ...]
    head: int
    layout: Layout


def fingerprint(block: nn.Module) -> tuple[int, ...]:
    return tuple(map(id, block.modules()))


def plan(block: blocks.Squeezable, ndim: int) -> Plan:
    """The block's plan for ``ndim`` spatial dims; rebuilt (outside ``torch.compile``) when
    a child was replaced since it was made."""
    found = block._plans.get(ndim)
    if torch.compiler.is_compiling() and found is not None:
        return found
    key = fingerprint(block)
    if found is None or found.fingerprint != key:
        if found is not None:
            block._geometry_cache.clear()
            block._auto_cache.clear()
        head = block._online_head(block.named_parts())
        found = Plan(key, head, block.layout(ndim, head))
        block._plans[ndim] = found
    return found


# --- live terms: affine maps in grouped-kernel form --------------------------------------------
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


def _per_channel(scale: Tensor | None, bias: Tensor | None, channels: int | None, ndim: int):
    ones = (1,) * ndim
    return Term(None, scale, bias, channels, 1, ones, ((0, 0),) * ndim, ones)


def _is_channel_scale(conv: nn.Module) -> bool:
    """A depthwise 1x1 conv without stride or padding: a per-channel scale (OREPA's)."""
    return (
        conv.groups == conv.in_channels == conv.out_channels
        and all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and not any(map(any, primitives.conv_padding(conv)))
    )


@dataclass(frozen=True)
class _Ctx:
    """How terms are built: spatial dimensionality and precision (``live`` for online
    training, ``exact`` float64 copies for deploy, ``structure`` for the layout)."""

    ndim: int
    how: Precision


def term_of(node: nn.Module, c_in: int, path: str, ctx: _Ctx) -> Term:
    """The live term of a node: a block, an ``nn.Sequential`` or one layer."""
    ndim = ctx.ndim
    if isinstance(node, blocks.Squeezable) and not node.deployed and node._combine == "chain":
        return _chain_of(node.named_parts(), c_in, path, ctx)
    if isinstance(node, blocks.Squeezable) and not node.deployed and node._combine == "sum":
        terms = [term_of(m, c_in, blocks.join(path, n), ctx) for n, m in node.named_parts()]
        return _sum(terms, node.geometry(ndim).c_out or c_in, ctx)
    if isinstance(node, nn.Sequential):
        return _chain_of(list(node.named_children()), c_in, path, ctx)
    if isinstance(node, primitives.CONVS):
        weight, bias = _conv_tensors(node, path, ctx.how)
        if _is_channel_scale(node):
            return _per_channel(weight, bias, node.out_channels, ndim)
        pad = primitives.conv_padding(node)
        return Term(
            weight, None, bias, node.out_channels, node.groups, tuple(node.stride), pad,
            tuple(node.dilation),
        )  # fmt: skip
    if isinstance(node, _BatchNorm):
        if ctx.how.kind == "structure":  # the pattern of a per-channel map: a unit scale
            return _per_channel(None, None, node.num_features, ndim)
        scale, shift = primitives.bn_affine(node, path, ctx.how)
        return _per_channel(scale.reshape(-1, *(1,) * (ndim + 1)), shift, len(scale), ndim)
    if isinstance(node, nn.Identity):
        return _per_channel(None, None, None, ndim)
    if isinstance(node, primitives.POOLS):
        geo = primitives.geometry(node, ndim, path)
        divisor = getattr(node, "divisor_override", None) or math.prod(geo.extent)
        weight = torch.full(
            (c_in, 1, *geo.extent), 1.0 / divisor, dtype=ctx.how.dtype, device=ctx.how.device
        )
        return Term(weight, None, None, c_in, c_in, geo.stride, geo.pad, (1,) * ndim)
    return _from_map(blocks.node_map(node, c_in, ndim, path, ctx.how))  # generic, dense


def _conv_tensors(conv: nn.Module, path: str, how: Precision) -> tuple[Tensor, Tensor | None]:
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


def _chain_of(parts: list[tuple[str, nn.Module]], c_in: int, path: str, ctx: _Ctx) -> Term:
    """The term of named children run in order."""
    total = None
    for name, child in parts:
        t = term_of(child, c_in, blocks.join(path, name), ctx)
        total = t if total is None else _chain(total, t, c_in, ctx)
        c_in = t.channels or c_in
    return total


def _from_map(m: ConvMap) -> Term:
    ndim = m.ndim
    return Term(m.weight, None, m.bias, m.weight.shape[0], 1, m.stride, m.pad, (1,) * ndim)


def _as_kernel(t: Term, channels: int, groups: int, ctx: _Ctx) -> Term:
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


def _to_map(t: Term, c_in: int, ctx: _Ctx) -> ConvMap:
    """A term as a dense :class:`ConvMap` (the generic fallback)."""
    t = _as_kernel(t, t.channels or c_in, 1, ctx)
    weight = dense_kernel(t.weight, t.groups, t.dilation)
    bias = t.bias if t.bias is not None else weight.new_zeros(weight.shape[0])
    return ConvMap(weight, bias, t.stride, t.pad)


def _grouped(w: Tensor, groups: int) -> Tensor:
    """``(C_out, C_in/g, *k)`` viewed as ``(g, C_out/g, C_in/g, *k)``."""
    return w.reshape(groups, w.shape[0] // groups, *w.shape[1:])


def _scale_inputs(w: Tensor, scale: Tensor, groups: int) -> Tensor:
    """``w`` (grouped) followed by a depthwise kernel ``scale`` on its inputs: input channel
    ``i`` multiplied by ``scale[i]``, whose shape is ``(C, 1, *k)`` (``k`` all 1: a scale)."""
    if groups == 1:
        return w * scale.reshape(1, scale.shape[0], *scale.shape[2:])  # (1, C, *k)
    per_group = scale.reshape(groups, 1, w.shape[1], *scale.shape[2:])
    return (_grouped(w, groups) * per_group).flatten(0, 1)


def bias_through(w: Tensor, groups: int, bias: Tensor) -> Tensor:
    """The output of kernel ``w`` on a constant input ``bias`` (per input channel)."""
    taps = w.sum(dim=tuple(range(2, w.dim())))  # (C_out, C_in/g)
    if groups == 1:
        return taps @ bias
    out = torch.einsum("goi,gi->go", _grouped(taps, groups), bias.reshape(groups, -1))
    return out.reshape(-1)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _chain(a: Term, b: Term, c_mid: int, ctx: _Ctx) -> Term:
    """The term ``x -> b(a(x))``; ``c_mid`` is the number of channels between them."""
    if b.weight is None:  # per-channel after anything
        if b.scale is None:
            return replace(a, bias=_add(a.bias, b.bias), channels=a.channels or b.channels)
        bias = a.bias * b.scale.reshape(-1) if a.bias is not None else None
        if a.weight is None:
            scale = b.scale if a.scale is None else a.scale * b.scale
            return replace(a, scale=scale, bias=_add(bias, b.bias), channels=len(b.scale))
        # exact-mode kernels are fresh copies (see _conv_tensors): scaled in place
        weight = a.weight * b.scale if ctx.how.kind == "live" else a.weight.mul_(b.scale)
        return replace(a, weight=weight, bias=_add(bias, b.bias))
    bias = b.bias
    if a.bias is not None:
        bias = _add(bias, bias_through(b.weight, b.groups, a.bias))
    if a.weight is None:  # per-channel before a kernel
        weight = b.weight if a.scale is None else _scale_inputs(b.weight, a.scale, b.groups)
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
                "gom,gmi...->goi...", _grouped(b.weight, groups).flatten(2),
                _grouped(a.weight, groups),
            ).flatten(0, 1)  # fmt: skip
        elif depthwise_b:
            groups, weight = a.groups, a.weight * b.weight
        elif depthwise_a:
            groups, weight = b.groups, _scale_inputs(b.weight, a.weight, b.groups)
    elif all(k == 1 for k in a.kernel):  # a pointwise a, then a k x k b
        dilation = tuple(d * s for d, s in zip(b.dilation, a.stride, strict=True))
        if a.groups == b.groups:
            groups = a.groups
            weight = torch.einsum(
                "gom...,gmi->goi...", _grouped(b.weight, groups),
                _grouped(a.weight, groups).flatten(2),
            ).flatten(0, 1)  # fmt: skip
        elif depthwise_b:
            groups, weight = a.groups, b.weight * a.weight
        elif depthwise_a:
            groups, weight = b.groups, _scale_inputs(b.weight, a.weight, b.groups)
    if weight is None:  # two k x k kernels or mixed groups: the dense algebra
        m = chain(_to_map(a, 0, ctx), _to_map(b, c_mid, ctx))
        return _from_map(ConvMap(m.weight, m.bias, m.stride, m.pad))
    return Term(weight, None, bias, b.channels, groups, stride, pad, dilation)


def _sum(terms: list[Term], channels: int, ctx: _Ctx) -> Term:
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
        return _per_channel(scale, bias, channels, ndim)
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
        m = parallel([_to_map(t, channels, ctx) for t in terms])
        return _from_map(m)
    size = tuple((e - 1) // dil + 1 for e, dil in zip(extent, dilation, strict=True))
    starts = [tuple(o // dil for o, dil in zip(off, dilation, strict=True)) for off in offsets]
    if ctx.how.kind != "live":
        weight = _sum_in_place(terms, starts, size, channels, groups, ctx)
        return Term(weight, None, bias, channels, groups, terms[0].stride, pad, tuple(dilation))
    # out of place, for autograd and torch.compile: sum the kernels of one size and place
    # first, then pad each sum once into the window
    placed: dict[tuple, Tensor] = {}
    for t, start in zip(terms, starts, strict=True):
        w = _as_kernel(t, channels, groups, ctx).weight
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
    ctx: _Ctx,
) -> Tensor:
    """The kernels of aligned terms summed in place into one ``groups``-grouped kernel of
    ``size`` (each at its start), per-channel terms added onto its diagonal: no dense
    diagonal, no padded copies. Only for exact mode, whose kernels are fresh copies (see
    :func:`_conv_tensors`), never the parameters themselves."""
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


def block_layout(block: blocks.Squeezable, ndim: int, head: int) -> Layout:
    """The layout of a block's first ``head`` children, composed with indicator weights."""
    ctx, c_in = _Ctx(ndim, STRUCTURE), block._in_channels()
    parts = block.named_parts()
    if head == len(parts):
        return term_layout(term_of(block, c_in, "", ctx), c_in, ctx)
    return term_layout(_chain_of(parts[:head], c_in, "", ctx), c_in, ctx)


def exact_composite(
    block: blocks.Squeezable, lay: Layout, how: Precision
) -> tuple[Tensor, Tensor | None]:
    """The block's ``(weight, bias)`` in the layout ``lay``, from its tensors as ``how`` says
    (``exact``: detached float64 copies)."""
    ctx, c_in = _Ctx(block._require_ndim(), how), block._in_channels()
    return pack(term_of(block, c_in, "", ctx), lay, c_in, ctx)


def term_layout(t: Term, c_in: int, ctx: _Ctx) -> Layout:
    """The layout of a structural term (indicator weights), read from its grouped form."""
    channels = t.channels or c_in
    t = _as_kernel(t, channels, channels, ctx)  # a per-channel map is depthwise
    return grouped_layout(t.weight, t.groups, t.dilation, t.stride, t.pad)


def pack(t: Term, lay: Layout, c_in: int, ctx: _Ctx) -> tuple[Tensor, Tensor | None]:
    """The ``(weight, bias)`` of the planned convolution from the block's term."""
    t = _as_kernel(t, t.channels or c_in, lay.groups, ctx)
    widths = []
    for d in reversed(range(ctx.ndim)):
        offset = lay.padding[d] - t.pad[d][0]
        if t.kernel[d] > 1 and t.dilation[d] != lay.dilation[d] or offset % lay.dilation[d]:
            widths = None
            break
        front = offset // lay.dilation[d]
        widths += [front, lay.kernel_size[d] - t.kernel[d] - front]
    if t.groups != lay.groups or widths is None or min(widths) < 0:
        return lay.pack(_to_map(t, c_in, ctx))  # the layout regroups or re-dilates
    return (F.pad(t.weight, widths) if any(widths) else t.weight), t.bias


# --- the online forward pass ----------------------------------------------------------------
def forward(block: blocks.Squeezable, x: Tensor, ndim: int) -> Tensor:
    """Runs a block in online mode: compose the kernel, one convolution, the tail."""
    p = plan(block, ndim)
    parts = block.named_parts()
    lay = p.layout
    param = next(block.parameters(), x)
    ctx = _Ctx(ndim, Precision("live", param.dtype, param.device))
    if p.head == len(parts):
        term = term_of(block, lay.in_channels, "", ctx)
    else:
        term = _chain_of(parts[: p.head], lay.in_channels, "", ctx)
    weight, bias = pack(term, lay, lay.in_channels, ctx)
    mode, padding = block.geometry(ndim).mode, lay.padding
    if mode not in (None, "zeros"):  # zeros are the conv's own padding: no padded copy
        x, padding = primitives.pad(x, tuple((q, q) for q in padding), mode), 0
    y = primitives.CONV_FN[ndim](x, weight, bias, lay.stride, padding, lay.dilation, lay.groups)
    for _, bn in parts[p.head :]:
        y = bn(y)
    return y


def composed(block: blocks.Squeezable, ndim: int) -> tuple[Tensor, Tensor | None]:
    """The live ``(weight, bias)`` online mode would convolve with (autograd kept)."""
    p = plan(block, ndim)
    param = next(block.parameters())
    ctx = _Ctx(ndim, Precision("live", param.dtype, param.device))
    term = _chain_of(block.named_parts()[: p.head], p.layout.in_channels, "", ctx)
    return pack(term, p.layout, p.layout.in_channels, ctx)


def bn_blocks_online(block: blocks.Squeezable, ndim: int) -> bool:
    """Whether a BatchNorm that online mode would fold uses batch statistics right now."""
    head = block.named_parts()[: plan(block, ndim).head]
    return any(
        isinstance(m, _BatchNorm) and primitives.uses_batch_stats(m)
        for _, h in head
        for m in h.modules()
    )


# --- mode="auto": measured on the device it runs ----------------------------------------------
def pick_mode(block: blocks.Squeezable, x: Tensor, ndim: int) -> str:
    """``"chain"`` or ``"online"`` for this forward pass.

    ``mode="auto"``: at the first batch of each (input shape, dtype, device, training, grad)
    both forms are timed (:func:`choose_by_timing`) and the faster one is kept for the block;
    a BatchNorm with batch statistics inside the composed part forces ``"chain"``. Under
    ``torch.compile`` nothing is timed: a decision taken before compiling is reused, else the
    multiply-accumulate model decides (:func:`choose_by_macs`).
    """
    if block.mode != "auto":
        return block.mode
    training = torch.is_grad_enabled() and block.training
    key = (tuple(x.shape), x.dtype, x.device, training, bn_blocks_online(block, ndim))
    choice = block._auto_cache.get(key)
    if choice is not None:
        return choice
    if key[-1]:
        choice = "chain"
    elif torch.compiler.is_compiling():
        return choose_by_macs(block, tuple(x.shape), ndim)
    else:
        choice = choose_by_timing(block, x, ndim)
    block._auto_cache[key] = choice
    return choice


def choose_by_macs(block: blocks.Squeezable, shape: tuple[int, ...], ndim: int) -> str:
    """The mode with fewer multiply-accumulates for an input of ``shape`` (batch first)."""
    if bn_blocks_online(block, ndim):
        return "chain"
    costs = macs(block, tuple(shape[1:]), batch=shape[0])
    return "online" if costs["online"] < costs["chain"] else "chain"


def choose_by_timing(block: blocks.Squeezable, x: Tensor, ndim: int) -> str:
    """Times both forms on ``x`` (forward, and backward to the parameters when training)
    and returns the faster; running statistics and gradients are left as they were."""
    params = [p for p in block.parameters() if p.requires_grad]
    backward = torch.is_grad_enabled() and block.training and bool(params)
    saved = [b.detach().clone() for b in block.buffers()]
    x = x.detach()

    def step(run: Callable[[], Tensor]) -> Callable[[], object]:
        def go() -> object:
            y = run()
            if backward:
                return torch.autograd.grad(y.sum(), params, allow_unused=True)
            return y

        return go

    runs = {
        "chain": step(lambda: block._run_chain(x, ndim)),
        "online": step(lambda: forward(block, x, ndim)),
    }
    try:
        with torch.set_grad_enabled(backward):
            times = time_interleaved(runs, AUTO_REPEATS, x.device)
    finally:
        with torch.no_grad():
            for b, v in zip(block.buffers(), saved, strict=True):
                b.copy_(v)
    return min(times, key=times.get)


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each function, run in turn (synchronising on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# --- the multiply-accumulate model (fallback of auto under compile, and Squeezable.macs) ------
def macs(block: blocks.Squeezable, input_shape: tuple[int, ...], batch: int = 1) -> dict:
    """Multiply-accumulates of one forward pass of a batch in each mode.

    Args:
        block: the block.
        input_shape: ``(C, *spatial)`` of one sample.
        batch: batch size.

    Returns:
        ``{"chain": ..., "online": ...}``; online counts the kernel composition (paid once per
        forward, whatever the batch, as dense products: an upper bound) plus one convolution
        per sample.
    """
    ndim = block._ndim or len(input_shape) - 1
    spatial = tuple(float(v) for v in input_shape[1:])
    chain_cost, _ = node_macs(block, spatial, ndim)
    p = plan(block, ndim)
    lay = p.layout
    out = [s / st for s, st in zip(spatial, lay.stride, strict=True)]
    per_out = lay.out_channels * lay.in_channels / lay.groups * math.prod(lay.kernel_size)
    parts = block.named_parts()
    head = parts[: p.head] if block._combine == "chain" else [("", block)]
    compose = compose_macs(head, ndim)
    return {"chain": batch * chain_cost, "online": batch * math.prod(out) * per_out + compose}


def node_macs(
    module: nn.Module, spatial: tuple[float, ...], ndim: int
) -> tuple[float, tuple[float, ...]]:
    """``(multiply-accumulates, output spatial size)`` of running a node layer by layer."""
    if isinstance(module, blocks.Squeezable) and module.deployed:
        return node_macs(module.conv, spatial, ndim)
    if isinstance(module, (blocks.Squeezable, nn.Sequential)):
        parts = blocks._parts(module)
        if getattr(module, "_combine", "chain") != "chain":  # branches see the same input
            costs = [node_macs(m, spatial, ndim) for _, m in parts]
            return sum(c for c, _ in costs), costs[0][1]
        total = 0.0
        for _, m in parts:
            cost, spatial = node_macs(m, spatial, ndim)
            total += cost
        return total, spatial
    g = primitives.geometry(module, ndim, "")
    out = tuple(s / st for s, st in zip(spatial, g.stride, strict=True))
    if isinstance(module, primitives.CONVS):
        per = module.in_channels // module.groups * math.prod(module.kernel_size)
        return math.prod(out) * module.out_channels * per, out
    return 0.0, out  # pools, BatchNorm, identity: cheap next to the convolutions


def compose_macs(parts: list[tuple[str, nn.Module]], ndim: int) -> float:
    """Multiply-accumulates of composing a chain's dense kernels (once per forward)."""
    total = 0.0
    acc = None
    for _, m in parts:
        g = blocks.node_geometry(m, ndim, "")
        nested = isinstance(m, (blocks.Squeezable, nn.Sequential)) and not getattr(
            m, "deployed", False
        )
        if nested and getattr(m, "_combine", "chain") != "chain":
            total += sum(compose_macs([p], ndim) for p in m.named_parts())
        elif nested:
            total += compose_macs(blocks._parts(m), ndim)
        # layers that keep their channel count (pool, identity) get them from the next layer
        c_mid = acc.c_out if acc is not None and acc.c_out is not None else g.c_in
        if acc is not None and g.c_out is not None:
            total += (
                g.c_out * c_mid * (acc.c_in or c_mid) * math.prod(g.extent) * math.prod(acc.extent)
            )
        if acc is None:
            acc = g
        elif g.c_in is not None:
            extent = tuple(
                a + s * (e - 1) for a, s, e in zip(acc.extent, acc.stride, g.extent, strict=True)
            )
            stride = tuple(a * b for a, b in zip(acc.stride, g.stride, strict=True))
            acc = Geometry(stride, acc.pad, extent, None, acc.c_in or c_mid, g.c_out)
    return total


# --- measuring -------------------------------------------------------------------------------
def count_ops(fn: Callable[..., object], *args: object) -> tuple[int, list[str]]:
    """Top-level aten operators of one call ``fn(*args)``: profiler events with no parent op.

    Calls ``fn`` once untimed first (plans and caches are built then), then once under
    ``torch.profiler`` on the CPU. Returns the count and the operator names in order.
    """
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    names = [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    return len(names), names
