"""The exact map of a block tree as one dense :class:`~repsqueeze.core.algebra.ConvMap`.

The general composition: every layer as a dense kernel (groups expanded, dilation 1),
chains through :func:`~repsqueeze.core.algebra.chain`, sums through
:func:`~repsqueeze.core.algebra.parallel`, concatenations through
:func:`~repsqueeze.core.algebra.concat`. The grouped-kernel terms of
:mod:`repsqueeze.core.terms` are the fast form of the same map and fall back to this one
where their rules do not apply.
"""

from __future__ import annotations

from torch import nn

from repsqueeze.core import primitives, tree
from repsqueeze.core.algebra import ConvMap, chain, concat, parallel
from repsqueeze.core.primitives import Values
from repsqueeze.core.tree import Combinator, join


def map_of(node: nn.Module, c_in: int, ndim: int, path: str, how: Values) -> ConvMap:
    """The node as a dense map on ``c_in`` input channels, built from values as ``how`` says."""
    return tree.visit(node, _MAP, c_in, ndim, path, how)


def chain_map(
    parts: list[tuple[str, nn.Module]], c_in: int, ndim: int, path: str, how: Values
) -> ConvMap:
    """The map of parts run in order."""
    total = None
    for name, child in parts:
        m = map_of(child, c_in, ndim, join(path, name), how)
        total = m if total is None else chain(total, m)
        c_in = m.weight.shape[0]
    return total


class _Map:
    def layer(self, m: nn.Module, c_in: int, ndim: int, path: str, how: Values) -> ConvMap:
        return primitives.linear_map(m, c_in, ndim, path, how)

    def deployed(self, m: Combinator, c_in: int, ndim: int, path: str, how: Values) -> ConvMap:
        conv = primitives.linear_map(m.conv, c_in, ndim, join(path, "conv"), how)
        geo = m.deployed_geometry
        # Drop the zero taps a symmetric-padding conv added around an asymmetric window.
        window = tuple(
            slice(q - l, q - l + e)
            for (q, _), (l, _), e in zip(conv.pad, geo.pad, geo.extent, strict=True)
        )
        weight = conv.weight[(slice(None), slice(None), *window)]
        return ConvMap(weight, conv.bias, conv.stride, geo.pad)

    def chain(self, m: nn.Module, c_in: int, ndim: int, path: str, how: Values) -> ConvMap:
        return chain_map(tree.parts(m), c_in, ndim, path, how)

    def sum(self, m: Combinator, c_in: int, ndim: int, path: str, how: Values) -> ConvMap:
        return parallel([map_of(p, c_in, ndim, join(path, n), how) for n, p in m.named_parts()])

    def concat(self, m: Combinator, c_in: int, ndim: int, path: str, how: Values) -> ConvMap:
        return concat([map_of(p, c_in, ndim, join(path, n), how) for n, p in m.named_parts()])

    def split(self, m: Combinator, c_in: int, ndim: int, path: str, how: Values) -> ConvMap:
        maps = [
            map_of(p, c, ndim, join(path, n), how)
            for (n, p), c in zip(m.named_parts(), m.split, strict=True)
        ]
        return concat(maps, split=True)


_MAP = _Map()
