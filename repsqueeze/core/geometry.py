"""The geometry of a block tree: stride, border, window and channels, from structure alone.

A chain's border is its layers' padding summed through the strides
(``P = sum_i p_i * prod_{j<i} s_j``); parallel and concatenated parts must share stride,
alignment (``pad_left + pad_right - window``), padding mode and input channels, and pad once
by the largest part's border. Every check names the offending layer by its state-dict path.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from repsqueeze.core import primitives, tree
from repsqueeze.core.primitives import Geometry, identity_geometry, name_of
from repsqueeze.core.tree import Combinator, join

_OWNER = "geometry"


def ndim_of(node: nn.Module, path: str = "") -> int | None:
    """Spatial dimensionality fixed by a node; ``ValueError`` when its layers disagree."""
    return tree.visit(node, _NDIM, path)


def geometry_of(node: nn.Module, ndim: int, path: str = "") -> Geometry:
    """Stride, padding, window and channels of a node (kept per block and ``ndim``)."""
    return tree.visit(node, _GEOMETRY, ndim, path)


def forget(block: Combinator) -> None:
    """Drops the geometry kept for a block (its parts changed)."""
    block.memo(_OWNER).clear()


def require_ndim(block: Combinator) -> int:
    """The block's spatial dimensionality; ``ValueError`` when no layer fixes it."""
    ndim = ndim_of(block)
    if ndim is None:
        raise ValueError(
            f"{type(block).__name__}: no layer fixes the spatial dimensionality (only "
            "Identity/SyncBatchNorm); add a ConvNd, BatchNormNd or AvgPoolNd"
        )
    return ndim


def in_channels(block: Combinator) -> int:
    """The block's input channels; ``ValueError`` when no layer fixes them."""
    c_in = geometry_of(block, require_ndim(block)).c_in
    if c_in is None:
        raise ValueError(
            f"{type(block).__name__}: no layer fixes the number of channels (only Identity/"
            "AvgPool); add a convolution or a BatchNorm"
        )
    return c_in


def padding_mode(block: Combinator) -> str:
    """The padding mode of the block's one border (``"zeros"`` when it pads nothing)."""
    return geometry_of(block, require_ndim(block)).padding_mode or "zeros"


class _Ndim:
    def layer(self, m: nn.Module, path: str) -> int | None:
        if not primitives.is_primitive(m):
            primitives.geometry(m, 2, path)  # raises the TypeError naming the layer
        return primitives.ndim_of(m)

    def deployed(self, m: Combinator, path: str) -> int:
        return m.conv.weight.dim() - 2

    def chain(self, m: nn.Module, path: str) -> int | None:
        if isinstance(m, Combinator) and "ndim" in m.memo(_OWNER):
            return m.memo(_OWNER)["ndim"]
        found, where = None, ""
        for name, child in tree.parts(m):
            n = ndim_of(child, join(path, name))
            if n is not None and found is not None and n != found:
                raise ValueError(
                    f"{name_of(child, join(path, name))} is {n}-D but {where} is {found}-D; "
                    "one block has one spatial dimensionality"
                )
            if n is not None and found is None:
                found, where = n, name_of(child, join(path, name))
        if isinstance(m, Combinator):
            m.memo(_OWNER)["ndim"] = found
        return found

    sum = concat = split = chain


class _Geometry:
    def layer(self, m: nn.Module, ndim: int, path: str) -> Geometry:
        return primitives.geometry(m, ndim, path)

    def deployed(self, m: Combinator, ndim: int, path: str) -> Geometry:
        return m.deployed_geometry

    def _kept(self, m: nn.Module, ndim: int, path: str, combine) -> Geometry:
        if not isinstance(m, Combinator):
            return combine(tree.parts(m), ndim, path)
        memo = m.memo(_OWNER)
        if ndim not in memo:
            memo[ndim] = combine(m.named_parts(), ndim, path)
        return memo[ndim]

    def chain(self, m: nn.Module, ndim: int, path: str) -> Geometry:
        return self._kept(m, ndim, path, chain_geometry)

    def sum(self, m: Combinator, ndim: int, path: str) -> Geometry:
        return self._kept(m, ndim, path, parallel_geometry)

    def concat(self, m: Combinator, ndim: int, path: str) -> Geometry:
        return self._kept(m, ndim, path, concat_geometry)

    def split(self, m: Combinator, ndim: int, path: str) -> Geometry:
        def combine(parts, ndim, path):
            return concat_geometry(parts, ndim, path, m.split)

        return self._kept(m, ndim, path, combine)


_NDIM, _GEOMETRY = _Ndim(), _Geometry()


def chain_geometry(parts: list[tuple[str, nn.Module]], ndim: int, path: str) -> Geometry:
    """The geometry of parts run in order; ``ValueError`` when channels or modes disagree."""
    total = identity_geometry(ndim)
    stride, pad, extent = list(total.stride), [list(p) for p in total.pad], list(total.extent)
    mode = mode_from = None
    c_in = channels = None
    last = None
    for name, child in parts:
        where = join(path, name)
        g = geometry_of(child, ndim, where)
        if g.padding_mode is not None:
            _check_mode(mode, mode_from, g.padding_mode, name_of(child, where))
            mode, mode_from = g.padding_mode, mode_from or name_of(child, where)
        if g.c_in is not None:
            if channels is not None and g.c_in != channels:
                raise ValueError(
                    f"{name_of(child, where)} expects {g.c_in} input channels but "
                    f"{last} produces {channels}"
                )
            c_in = c_in if channels is not None else g.c_in
            channels, last = g.c_out, name_of(child, where)
        for d in range(ndim):
            pad[d][0] += stride[d] * g.pad[d][0]
            pad[d][1] += stride[d] * g.pad[d][1]
            extent[d] += stride[d] * (g.extent[d] - 1)
            stride[d] *= g.stride[d]
    return Geometry(tuple(stride), tuple(map(tuple, pad)), tuple(extent), mode, c_in, channels)


def parallel_geometry(parts: list[tuple[str, nn.Module]], ndim: int, path: str) -> Geometry:
    """The geometry of summed parts (:func:`aligned_geometry`, equal output channels)."""
    geos, common = aligned_geometry(parts, ndim, path, "parallel branches")
    c_in = common.c_in
    c_out = next((g.c_out for _, g in geos if g.c_out is not None), None)
    for name, g in geos:
        if g.c_out is not None and g.c_out != c_out:
            raise ValueError(
                f"{name} gives {g.c_out} output channels but another branch gives {c_out}"
            )
        if g.c_in is None and c_in is not None and c_in != c_out:
            raise ValueError(
                f"{name} keeps its channel count, but the other branches map {c_in} to {c_out} "
                "channels; an identity-like branch needs equal input and output channels"
            )
    c_in = c_in if c_in is not None else c_out
    c_out = c_out if c_out is not None else c_in
    return replace(common, c_in=c_in, c_out=c_out)


def concat_geometry(
    parts: list[tuple[str, nn.Module]], ndim: int, path: str, split: tuple[int, ...] | None = None
) -> Geometry:
    """Like :func:`parallel_geometry`; the output channels are the sum of the branches'.

    With ``split`` branch ``i`` reads ``split[i]`` channels and the input has their sum.
    """
    what = "concatenated branches"
    geos, common = aligned_geometry(parts, ndim, path, what, shared_input=split is None)
    if split is not None:
        c_out = 0
        for (name, g), c in zip(geos, split, strict=True):
            if g.c_in is not None and g.c_in != c:
                raise ValueError(
                    f"{name} takes {g.c_in} input channels but split gives it {c}; with split, "
                    "branch i reads split[i] channels of the input"
                )
            c_out += g.c_out if g.c_out is not None else c
        return replace(common, c_in=sum(split), c_out=c_out)
    if common.c_in is None:
        where = f"Concat at {path}" if path else "Concat"
        raise ValueError(
            f"{where}: no branch fixes the number of input channels (only Identity/AvgPool "
            "branches), so the number of output channels is unknown; add a convolution or a "
            "BatchNorm to one branch"
        )
    c_out = sum(g.c_out if g.c_out is not None else common.c_in for _, g in geos)
    return replace(common, c_out=c_out)


def aligned_geometry(
    parts: list[tuple[str, nn.Module]],
    ndim: int,
    path: str,
    what: str,
    shared_input: bool = True,
) -> tuple[list[tuple[str, Geometry]], Geometry]:
    """Checks that branches share stride, alignment, padding mode and input channels.

    Args:
        parts: the named branches.
        ndim: spatial dimensionality.
        path: where the branches sit, for the messages.
        what: the branches' kind in the messages (``"parallel branches"``).
        shared_input: the branches read the same input (else input channels are not checked).

    Returns:
        ``(name, geometry)`` per branch, and the common geometry (largest padding per side,
        its window, the mode, the input channels or ``None``; output channels ``None``).
    """
    geos = [(name_of(m, join(path, n)), geometry_of(m, ndim, join(path, n))) for n, m in parts]
    first_name, first = geos[0]
    mode = mode_from = None
    c_in, c_in_from = next(((g.c_in, n) for n, g in geos if g.c_in is not None), (None, None))
    for name, g in geos:
        if g.stride != first.stride:
            raise ValueError(
                f"{name} has stride {g.stride} but {first_name} has {first.stride}; "
                f"{what} must share stride"
            )
        if g.slack != first.slack:
            raise ValueError(
                f"{name} is misaligned with {first_name}: padding {g.pad} with window "
                f"{g.extent} vs padding {first.pad} with window {first.extent}; {what} must "
                "satisfy pad_left + pad_right - window = same value so their outputs overlap"
            )
        if g.padding_mode is not None:
            _check_mode(mode, mode_from, g.padding_mode, name)
            mode, mode_from = g.padding_mode, mode_from or name
        if shared_input and g.c_in is not None and g.c_in != c_in:
            raise ValueError(
                f"{name} takes {g.c_in} input channels but {c_in_from} takes {c_in}; "
                f"{what} read the same input"
            )
    pad = tuple(
        (max(g.pad[d][0] for _, g in geos), max(g.pad[d][1] for _, g in geos)) for d in range(ndim)
    )
    extent = tuple(p[0] + p[1] - s for p, s in zip(pad, first.slack, strict=True))
    return geos, Geometry(first.stride, pad, extent, mode, c_in, None)


def _check_mode(mode: str | None, mode_from: str | None, new: str, where: str) -> None:
    if mode is not None and new != mode:
        raise ValueError(
            f"{where} pads with padding_mode='{new}' but {mode_from} pads with '{mode}'; "
            "a block pads its input once, so all its padded layers must share one mode"
        )
