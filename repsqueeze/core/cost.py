"""The multiply-accumulate model of a block in each mode, and an operator counter.

Chain mode pays every layer on every sample; online mode pays the kernel composition once
per forward pass (counted as dense products: an upper bound) plus one convolution per
sample. Auto mode falls back on this model where it cannot time (under ``torch.compile``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn
from torch.profiler import ProfilerActivity, profile

from repsqueeze.core import online, primitives, tree
from repsqueeze.core.geometry import geometry_of, ndim_of
from repsqueeze.core.primitives import Geometry
from repsqueeze.core.tree import Combinator


def macs(block: Combinator, input_shape: tuple[int, ...], batch: int = 1) -> dict[str, float]:
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
    ndim = ndim_of(block) or len(input_shape) - 1
    spatial = tuple(float(v) for v in input_shape[1:])
    chain_cost, _ = node_macs(block, spatial, ndim)
    p = online.plan(block, ndim)
    lay = p.layout
    out = [s / st for s, st in zip(spatial, lay.stride, strict=True)]
    per_out = lay.out_channels * lay.in_channels / lay.groups * math.prod(lay.kernel_size)
    head = block.named_parts()[: p.head] if block.combine == "chain" else [("", block)]
    compose = compose_macs(head, ndim)
    return {"chain": batch * chain_cost, "online": batch * math.prod(out) * per_out + compose}


def node_macs(
    node: nn.Module, spatial: tuple[float, ...], ndim: int
) -> tuple[float, tuple[float, ...]]:
    """``(multiply-accumulates, output spatial size)`` of running a node layer by layer."""
    return tree.visit(node, _RUN_COST, spatial, ndim)


def compose_macs(parts: list[tuple[str, nn.Module]], ndim: int) -> float:
    """Multiply-accumulates of composing a chain's dense kernels (once per forward)."""
    total = 0.0
    acc = None
    for _, m in parts:
        g = geometry_of(m, ndim)
        total += tree.visit(m, _INNER_COST, ndim)
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


class _RunCost:
    """``(multiply-accumulates, output size)`` of chain mode, per node."""

    def layer(self, m: nn.Module, spatial: tuple[float, ...], ndim: int):
        g = primitives.geometry(m, ndim, "")
        out = tuple(s / st for s, st in zip(spatial, g.stride, strict=True))
        if isinstance(m, primitives.CONVS):
            per = m.in_channels // m.groups * math.prod(m.kernel_size)
            return math.prod(out) * m.out_channels * per, out
        return 0.0, out  # pools, BatchNorm, identity: cheap next to the convolutions

    def deployed(self, m: Combinator, spatial: tuple[float, ...], ndim: int):
        return node_macs(m.conv, spatial, ndim)

    def chain(self, m: nn.Module, spatial: tuple[float, ...], ndim: int):
        total = 0.0
        for _, p in tree.parts(m):
            cost, spatial = node_macs(p, spatial, ndim)
            total += cost
        return total, spatial

    def sum(self, m: Combinator, spatial: tuple[float, ...], ndim: int):
        costs = [node_macs(p, spatial, ndim) for _, p in m.named_parts()]  # the same input
        return sum(c for c, _ in costs), costs[0][1]

    concat = split = sum


class _InnerCost:
    """Multiply-accumulates of composing a node's own parts (nothing for a layer)."""

    def layer(self, m: nn.Module, ndim: int) -> float:
        return 0.0

    deployed = layer

    def chain(self, m: nn.Module, ndim: int) -> float:
        return compose_macs(tree.parts(m), ndim)

    def sum(self, m: Combinator, ndim: int) -> float:
        return sum(compose_macs([p], ndim) for p in m.named_parts())

    concat = split = sum


_RUN_COST, _INNER_COST = _RunCost(), _InnerCost()


def count_ops(fn: Callable[..., object], *args: object) -> tuple[int, list[str]]:
    """Top-level aten operators of one call ``fn(*args)``: profiler events with no parent op.

    Calls ``fn`` once untimed first (plans and caches are built then), then once under
    ``torch.profiler`` on the CPU. Returns the count and the operator names in order.
    """
    fn(*args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    names = [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    return len(names), names
