"""The algebra of affine, translation-equivariant maps: how convolutions compose and add.

Every layer a block accepts (convolution, BatchNorm, identity, average pooling) is an affine
map ``x -> W * x + b`` that reads a window of the input, advances by a stride and, under
*border-consistent padding*, needs its input extended by a fixed number of samples on each
side. :class:`ConvMap` holds such a map with a dense kernel (dilation 1, groups expanded) in
float64, so that composition is plain arithmetic:

* chain ``b(a(x))``: kernel ``conv_transpose(W_b, W_a, stride=s_a)``, stride ``s_a * s_b``,
  padding ``p_a + s_a * p_b``, bias ``b_b + sum(W_b) @ b_a``;
* sum ``a(x) + b(x)``: kernels placed on a common window and added, biases added;
* concatenation ``cat(a(x), b(x))`` along channels: kernels placed on a common window and
  stacked along output channels, biases concatenated.

:func:`to_conv` turns a map back into the smallest ``nn.ConvNd`` (dilation and groups
recovered from the structural pattern, not from numerical zeros).

References: Ding et al., "RepVGG" (CVPR 2021) and "Diverse Branch Block" (CVPR 2021) for the
branch algebra; Guo et al., "ExpandNets" (NeurIPS 2020) for chains of convolutions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Pad = tuple[tuple[int, int], ...]

CONV_CLASSES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@dataclass
class ConvMap:
    """An affine map ``x -> W * x + b`` on an input pre-padded by ``pad``.

    Attributes:
        weight: dense kernel, shape ``(C_out, C_in, *extent)``, dilation 1, no groups.
        bias: shape ``(C_out,)``.
        stride: per spatial dim.
        pad: ``(left, right)`` samples the input must be extended by, per spatial dim.
    """

    weight: Tensor
    bias: Tensor
    stride: tuple[int, ...]
    pad: Pad

    @property
    def ndim(self) -> int:
        return self.weight.dim() - 2

    @property
    def extent(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def slack(self) -> tuple[int, ...]:
        """``pad_l + pad_r - extent``: with the stride, fixes the output length."""
        return tuple(l + r - e for (l, r), e in zip(self.pad, self.extent, strict=True))


def dense_kernel(weight: Tensor, groups: int, dilation: tuple[int, ...]) -> Tensor:
    """Expands a grouped, dilated kernel ``(C_out, C_in/g, *k)`` to ``(C_out, C_in, *extent)``."""
    if groups > 1:  # block-diagonal in one vectorised op: out[g, a, h, b] = W[g, a, b] * (g == h)
        c_out, c_in_g, *k = weight.shape
        blocks = weight.reshape(groups, c_out // groups, c_in_g, *k)
        eye = torch.eye(groups, dtype=weight.dtype, device=weight.device)
        weight = torch.einsum("gab...,gh->gahb...", blocks, eye).reshape(c_out, groups * c_in_g, *k)
    if all(d == 1 for d in dilation):
        return weight
    extent = [d * (n - 1) + 1 for d, n in zip(dilation, weight.shape[2:], strict=True)]
    dense = weight.new_zeros(*weight.shape[:2], *extent)
    dense[(slice(None), slice(None), *(slice(None, None, d) for d in dilation))] = weight
    return dense


def grouped(w: Tensor, groups: int) -> Tensor:
    """``(C_out, C_in/g, *k)`` viewed as ``(g, C_out/g, C_in/g, *k)``."""
    return w.reshape(groups, w.shape[0] // groups, *w.shape[1:])


def bias_through(w: Tensor, groups: int, bias: Tensor) -> Tensor:
    """The output of the grouped kernel ``w`` on a constant input ``bias`` (per input
    channel)."""
    taps = w.sum(dim=tuple(range(2, w.dim())))  # (C_out, C_in/g)
    if groups == 1:
        return taps @ bias
    out = torch.einsum("goi,gi->go", grouped(taps, groups), bias.reshape(groups, -1))
    return out.reshape(-1)


def chain(a: ConvMap, b: ConvMap) -> ConvMap:
    """The map ``x -> b(a(x))``."""
    # out[o, i, u * s_a + t] += W_b[o, m, u] * W_a[m, i, t]
    if all(e == 1 for e in b.extent):
        weight = torch.einsum("om,mi...->oi...", b.weight.flatten(1), a.weight)
    elif all(e == 1 for e in a.extent):
        taps = torch.einsum("om...,mi->oi...", b.weight, a.weight.flatten(1))
        extent = [(e - 1) * s + 1 for e, s in zip(b.extent, a.stride, strict=True)]
        weight = taps.new_zeros(*taps.shape[:2], *extent)
        weight[(slice(None), slice(None), *(slice(None, None, s) for s in a.stride))] = taps
    else:
        # conv_transpose treats b's output channels as a batch and a's kernel as its weight
        weight = _CONV_TRANSPOSE[a.ndim](b.weight, a.weight, stride=a.stride)
    bias = b.bias + b.weight.sum(dim=tuple(range(2, b.weight.dim()))) @ a.bias
    stride = tuple(sa * sb for sa, sb in zip(a.stride, b.stride, strict=True))
    pad = tuple(
        (pa[0] + sa * pb[0], pa[1] + sa * pb[1])
        for pa, pb, sa in zip(a.pad, b.pad, a.stride, strict=True)
    )
    return ConvMap(weight, bias, stride, pad)


def parallel(maps: list[ConvMap]) -> ConvMap:
    """The map ``x -> sum_i maps[i](x)``; the maps must share stride and slack."""
    pad, extent = _common_window(maps)
    first = maps[0].weight
    weight = first.new_zeros(*first.shape[:2], *extent)
    for m in maps:
        weight[(slice(None), slice(None), *_placed(m, pad))] += m.weight
    bias = torch.stack([m.bias for m in maps]).sum(0)
    return ConvMap(weight, bias, maps[0].stride, pad)


def concat(maps: list[ConvMap], split: bool = False) -> ConvMap:
    """The map ``x -> cat_channels(maps[0](x), maps[1](x), ...)`` (DBB's depth concatenation).

    The maps must share stride and slack; each kernel is placed at its offset in the common
    window and the kernels are stacked along output channels, as the biases.

    Args:
        maps: the branches' maps.
        split: the input is split along channels, ``maps[i]`` reading the ``i``-th slice: the
            kernels are also stacked along input channels (block-diagonal). Otherwise every
            map reads the whole input and the maps share input channels.
    """
    pad, extent = _common_window(maps)
    first = maps[0].weight
    rows, cols = zip(*(m.weight.shape[:2] for m in maps), strict=True)
    weight = first.new_zeros(sum(rows), sum(cols) if split else cols[0], *extent)
    row = col = 0
    for m, n, k in zip(maps, rows, cols, strict=True):
        inputs = slice(col, col + k) if split else slice(None)
        weight[(slice(row, row + n), inputs, *_placed(m, pad))] = m.weight
        row, col = row + n, col + k
    return ConvMap(weight, torch.cat([m.bias for m in maps]), maps[0].stride, pad)


def _common_window(maps: list[ConvMap]) -> tuple[Pad, tuple[int, ...]]:
    """The largest padding of aligned maps, per side, and the window it gives."""
    pad = tuple(
        (max(m.pad[d][0] for m in maps), max(m.pad[d][1] for m in maps))
        for d in range(maps[0].ndim)
    )
    extent = tuple(p[0] + p[1] - s for p, s in zip(pad, maps[0].slack, strict=True))
    return pad, extent


def _placed(m: ConvMap, pad: Pad) -> tuple[slice, ...]:
    """Where ``m``'s kernel sits in the common window of padding ``pad``."""
    return tuple(
        slice(pl - ml, pl - ml + e)
        for (pl, _), (ml, _), e in zip(pad, m.pad, m.extent, strict=True)
    )


def largest_groups(mask: Tensor) -> int:
    """The largest ``g`` such that the ``(C_out, C_in)`` mask is ``g``-block-diagonal."""
    c_out, c_in = mask.shape
    for g in sorted(_divisors(math.gcd(c_out, c_in)), reverse=True):
        o = torch.arange(c_out, device=mask.device) // (c_out // g)
        i = torch.arange(c_in, device=mask.device) // (c_in // g)
        if not (mask & (o[:, None] != i[None, :])).any():
            return g
    return 1


@dataclass(frozen=True)
class Layout:
    """Where a dense map's taps go in the smallest ``nn.ConvNd`` (decided by structure)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    widen: tuple[int, ...]  # F.pad amounts turning an asymmetric window symmetric

    def pack(self, m: ConvMap) -> tuple[Tensor, Tensor]:
        """The ``(weight, bias)`` of the convolution, from a map with this structure."""
        every = (slice(None), slice(None), *(slice(None, None, d) for d in self.dilation))
        weight = F.pad(m.weight, self.widen)[every]
        g, go, gi = self.groups, self.out_channels // self.groups, self.in_channels // self.groups
        if g > 1:  # the diagonal blocks, in one indexing op: (g, go, gi, *k)
            idx = torch.arange(g, device=weight.device)
            blocks = weight.reshape(g, go, g, gi, *weight.shape[2:])[idx, :, idx]
            weight = blocks.reshape(self.out_channels, gi, *weight.shape[2:])
        return weight, m.bias


def layout(structure: ConvMap) -> Layout:
    """The smallest convolution for a map, from its structural map.

    Args:
        structure: the map built from non-negative indicator weights; its non-zero pattern
            (no cancellation possible) decides kernel, dilation and groups, so the
            architecture never depends on the values of the weights.
    """
    ndim = structure.ndim
    return grouped_layout(structure.weight, 1, (1,) * ndim, structure.stride, structure.pad)


def grouped_layout(
    weight: Tensor, groups: int, dilation: tuple[int, ...], stride: tuple[int, ...], pad: Pad
) -> Layout:
    """:func:`layout` of the map whose kernel is ``weight`` grouped ``groups`` ways and dilated
    by ``dilation``, read from that compact form (no dense kernel is built).

    Args:
        weight: structural kernel ``(C_out, C_in / groups, *k)`` (non-negative indicators).
        groups: its groups.
        dilation: its dilation, per spatial dim.
        stride: the map's stride.
        pad: the map's ``(left, right)`` padding, per spatial dim.
    """
    ndim = weight.dim() - 2
    # nn.ConvNd pads symmetrically: widen an asymmetric window with zero taps.
    padding, front, widen = [], [], []
    for left, right in pad:
        q = max(left, right)
        padding.append(q)
        front.append(q - left)
        widen += [q - right, q - left]
    widen = widen[::-1]  # F.pad wants the last dim first, each as (front, back)
    nonzero = weight.ne(0)
    kernel = []
    dilations = []
    for d in range(ndim):
        other = tuple(i for i in range(ndim + 2) if i != d + 2)
        used = nonzero.any(dim=other).nonzero().flatten().tolist()
        window = dilation[d] * (weight.shape[d + 2] - 1) + 1 + padding[d] * 2 - sum(pad[d])
        step = math.gcd(*(front[d] + dilation[d] * i for i in used), window - 1) or 1
        dilations.append(step)
        kernel.append((window - 1) // step + 1)
    c_out, c_in = weight.shape[0], weight.shape[1] * groups
    return Layout(
        in_channels=c_in,
        out_channels=c_out,
        kernel_size=tuple(kernel),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilations),
        groups=largest_groups(_channel_mask(nonzero.flatten(2).any(-1), groups)),
        widen=tuple(widen),
    )


def _channel_mask(grouped: Tensor, groups: int) -> Tensor:
    """The ``(C_out, C_in)`` mask of a ``groups``-grouped ``(C_out, C_in / groups)`` one."""
    if groups == 1:
        return grouped
    c_out, c_in_g = grouped.shape
    mask = grouped.new_zeros(groups, c_out // groups, groups, c_in_g)
    idx = torch.arange(groups, device=grouped.device)
    mask[idx, :, idx] = grouped.reshape(groups, c_out // groups, c_in_g)
    return mask.reshape(c_out, groups * c_in_g)


def to_conv(
    structure: ConvMap,
    padding_mode: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    values: ConvMap | None = None,
) -> nn.Module:
    """Builds the smallest ``nn.ConvNd`` that computes a map on an unpadded input.

    Args:
        structure: the structural map (see :func:`layout`).
        padding_mode: padding mode of the result.
        dtype: dtype of the result.
        device: device of the result.
        values: the numerical map to copy in; ``None`` leaves the default initialisation
            (for building a deployed architecture whose weights a state dict will fill).
    """
    lay = layout(structure)
    if values is None:
        return conv_of(lay, padding_mode, dtype, device)
    weight, bias = lay.pack(values)
    return conv_of(lay, padding_mode, dtype, device, weight, bias)


def conv_of(
    lay: Layout,
    padding_mode: str,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> nn.Module:
    """The ``nn.ConvNd`` of a layout.

    Args:
        lay: the layout.
        padding_mode: padding mode of the result.
        dtype: dtype of the result.
        device: device of the result.
        weight: the packed kernel to hold (cast once to ``dtype``); ``None`` leaves the
            default initialisation (a deployed architecture a state dict will fill).
        bias: the bias to hold (zeros when ``None`` and ``weight`` is given).
        memory_format: memory format of the weight (``torch.channels_last`` keeps a
            channels-last model channels-last).
    """
    cls, kw = CONV_CLASSES[len(lay.kernel_size)], {"device": device, "dtype": dtype}
    args = (lay.in_channels, lay.out_channels, lay.kernel_size)
    shape = {
        "stride": lay.stride, "padding": lay.padding, "dilation": lay.dilation,
        "groups": lay.groups, "bias": True, "padding_mode": padding_mode,
    }  # fmt: skip
    if weight is None:
        conv = cls(*args, **shape, **kw)
        if memory_format is not torch.contiguous_format:
            conv.weight.data = conv.weight.data.contiguous(memory_format=memory_format)
        return conv
    conv = nn.utils.skip_init(cls, *args, **shape, **kw)  # no random init to overwrite
    # always a copy: the result never shares memory with the tensors it was built from
    conv.weight.data = torch.empty_like(weight, **kw, memory_format=memory_format).copy_(weight)
    conv.bias.data = torch.zeros(lay.out_channels, **kw)
    if bias is not None:
        conv.bias.data.copy_(bias)
    return conv


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
