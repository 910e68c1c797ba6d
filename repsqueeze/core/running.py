"""Chain mode: run a block tree's training form on an input padded once.

A block pads its input once, by its total border, with its padding mode, and every layer
runs unpadded (border-consistent padding). Zeros are not materialised where a convolution
can take them as its own padding; in front of the first layer that reads across the border,
pointwise convs, BatchNorm and ``Identity`` run on the interior only and carry the border as
one constant per channel (DBB's BN-and-pad layer, generalised:
:mod:`repsqueeze.core.chainops`). Parallel and concatenated parts each run on the window
they would have padded themselves.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import chainops, primitives, tree
from repsqueeze.core.algebra import Pad, bias_through
from repsqueeze.core.geometry import geometry_of
from repsqueeze.core.primitives import Values, pad
from repsqueeze.core.tree import Combinator


def run_block(block: Combinator, x: Tensor, ndim: int) -> Tensor:
    """The training form of a block, layer by layer, on an unpadded input ``(N, C, *spatial)``."""
    geo = geometry_of(block, ndim)
    none = ((0, 0),) * ndim
    if geo.padding_mode in (None, "zeros"):  # zeros: the first convolutions pad, no copy
        return run_node(block, x, none, ndim, geo.pad)
    x = pad(x, geo.pad, geo.padding_mode)  # (N, C, *spatial + total padding)
    return run_node(block, x, none, ndim, None)


def run_node(node: nn.Module, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None = None) -> Tensor:
    """Runs a node on ``x`` padded by the node's border plus ``ext`` for the layers after it.

    Args:
        node: a block, an ``nn.Sequential`` or one layer.
        x: the input, padded (``lazy`` of the padding, in zeros, not applied yet: a
            convolution takes those as its own padding, no copy).
        ext: border the output carries for the layers downstream, per spatial dim.
        ndim: spatial dimensionality.
        lazy: zeros not applied to ``x`` yet.
    """
    return tree.visit(node, _RUN, x, ext, ndim, lazy)


class _Run:
    def layer(self, m: nn.Module, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None) -> Tensor:
        return primitives.run(m, x, ext, ndim, lazy)

    def deployed(self, m: Combinator, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None):
        return _deployed_run(m, pad(x, lazy, "zeros"), ndim)

    def chain(self, m: nn.Module, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None) -> Tensor:
        return chain_run([p for _, p in tree.parts(m)], x, ext, ndim, lazy)

    def sum(self, m: Combinator, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None) -> Tensor:
        border = geometry_of(m, ndim).pad
        ys = run_branches(m.named_parts(), border, x, ext, ndim, lazy)
        return sum(ys[1:], ys[0])

    def concat(self, m: Combinator, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None) -> Tensor:
        split = m.split if m.combine == "split" else None
        if split is not None and x.shape[1] != sum(split):
            raise ValueError(
                f"{type(m).__name__}: split={split} needs {sum(split)} input channels, "
                f"got {x.shape[1]}"
            )
        border = geometry_of(m, ndim).pad
        ys = run_branches(m.named_parts(), border, x, ext, ndim, lazy, split)
        return torch.cat(ys, dim=1)  # (N, sum of the branches' C_out, *spatial)

    split = concat


_RUN = _Run()


def chain_run(
    layers: list[nn.Module], x: Tensor, ext: Pad, ndim: int, lazy: Pad | None = None
) -> Tensor:
    # Border each layer's output carries for the layers after it, computed back to front.
    exts = [ext]
    for layer in reversed(layers[1:]):
        g = geometry_of(layer, ndim)
        exts.append(
            tuple(
                (p[0] + s * e[0], p[1] + s * e[1])
                for p, s, e in zip(g.pad, g.stride, exts[-1], strict=True)
            )
        )
    # The lazy border stays unapplied while it is a per-channel constant (`fill`, None for
    # zeros): pointwise convs, BatchNorm and Identity run on the interior only, natively, and
    # map the constant (DBB's BN-and-pad, generalised); the first layer that reads across the
    # border gets it materialised.
    fill = None
    for layer, e in zip(layers, reversed(exts), strict=True):
        if lazy is not None and any(map(any, lazy)):
            kept = _constant_border_through(layer, x, fill, ndim)
            if kept is not None:
                x, fill = kept
                continue
            if fill is not None:
                x, lazy, fill = chainops.pad_filled(x, lazy, fill), None, None
        x = run_node(layer, x, e, ndim, lazy)
        lazy = None
    if fill is not None:
        x = chainops.pad_filled(x, lazy, fill)
    elif lazy is not None:
        x = pad(x, lazy, "zeros")
    return x


def _constant_border_through(
    layer: nn.Module, x: Tensor, fill: Tensor | None, ndim: int
) -> tuple[Tensor, Tensor | None] | None:
    """``(layer(interior), layer(border constant))`` when a layer maps a per-channel constant
    border to a per-channel constant and its interior output reads no border; else ``None``."""
    if isinstance(layer, nn.Identity):
        return x, fill
    if isinstance(layer, primitives.CONVS):
        if any(k != 1 for k in layer.kernel_size) or any(s != 1 for s in layer.stride):
            return None
        if any(map(any, primitives.conv_padding(layer))):
            return None
        y = primitives.CONV_FN[ndim](x, layer.weight, layer.bias, 1, 0, 1, layer.groups)
        if fill is not None:
            fill = bias_through(layer.weight, layer.groups, fill)
            fill = fill if layer.bias is None else fill + layer.bias
        else:
            fill = layer.bias
        return y, fill
    if isinstance(layer, _BatchNorm) and not primitives.syncs(layer):
        if primitives.uses_batch_stats(layer):
            primitives.check_values_per_channel(layer, x, ((0, 0),) * ndim)
            if chainops.fast_path(layer):  # one reduction for the interior and the border
                return chainops.batch_norm_with_border(layer, x, fill)
            # the statistics bn(x) normalises with, kept differentiable for the border
            var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=0)
            scale = torch.rsqrt(var + layer.eps)
            scale = scale * layer.weight if layer.affine else scale
            shift = layer.bias if layer.affine else torch.zeros_like(mean)
            if fill is None:  # bn(0) = bias - mean * scale
                fill = torch.addcmul(shift, mean, scale, value=-1)
            else:
                fill = torch.addcmul(shift, fill - mean, scale)
        else:
            live = Values("live", x.dtype, x.device)
            scale, shift = primitives.bn_affine(layer, "", live)
            fill = shift if fill is None else torch.addcmul(shift, fill, scale)
        return layer(x), fill
    return None


def run_branches(
    parts: list[tuple[str, nn.Module]],
    border: Pad,
    x: Tensor,
    ext: Pad,
    ndim: int,
    lazy: Pad | None,
    split: tuple[int, ...] | None = None,
) -> list[Tensor]:
    """Runs each branch on the window it would have padded itself.

    Args:
        parts: the named branches.
        border: the border ``x`` carries for them (the largest branch padding, per side).
        x: the input, padded by ``border`` plus what ``ext`` needs (``lazy`` of it not yet).
        ext: border the outputs carry for the layers downstream.
        ndim: spatial dimensionality.
        lazy: zeros of that padding not applied to ``x`` yet.
        split: channels of each branch's slice of ``x``; ``None``: all of ``x`` for each.
    """
    lazy = lazy or ((0, 0),) * ndim
    starts = [0, *itertools.accumulate(split)] if split is not None else None
    outputs = []
    for b, (_, branch) in enumerate(parts):
        channels = slice(starts[b], starts[b + 1]) if starts is not None else slice(None)
        own = geometry_of(branch, ndim).pad
        # the branch needs `own` border, not the block's: crop the difference, first
        # from the zeros not yet applied, then from x itself
        window, branch_lazy = [], []
        for d, ((pl, pr), (bl, br), (zl, zr)) in enumerate(zip(border, own, lazy, strict=True)):
            cl, cr = pl - bl, pr - br
            window.append(slice(max(cl - zl, 0), x.shape[d + 2] - max(cr - zr, 0)))
            branch_lazy.append((max(zl - cl, 0), max(zr - cr, 0)))
        full = starts is None and all(
            w.start == 0 and w.stop == n for w, n in zip(window, x.shape[2:], strict=True)
        )
        crop = x if full else x[(slice(None), channels, *window)]  # a view; none when full
        outputs.append(run_node(branch, crop, ext, ndim, tuple(branch_lazy)))
    return outputs


def _deployed_run(block: Combinator, x: Tensor, ndim: int) -> Tensor:
    conv, geo = block.conv, block.deployed_geometry
    # The input carries the block's own (possibly asymmetric) border; top it up with zeros
    # where the conv's symmetric padding has only zero taps.
    extra = tuple((q - l, q - r) for q, (l, r) in zip(conv.padding, geo.pad, strict=True))
    return primitives.run(conv, pad(x, extra, "zeros"), ((0, 0),) * ndim, ndim)
