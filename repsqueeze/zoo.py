"""Re-parameterizable blocks from the literature, each built from the core primitives.

Every block here is linear (a ``Parallel`` or ``SqueezableBlock``, no activation inside) and
squeezes into one convolution; models put the non-linearity between blocks. Through
:func:`make_block`, every kind with the same ``(in, out, k, stride, groups)`` deploys to the
same ``ConvNd(in, out, k, stride, padding=k // 2, groups=groups, bias=True)``.

References:
    Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric
    Convolution Blocks", ICCV 2019.
    Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.
    Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like Unit",
    CVPR 2021.
    Guo et al., "ExpandNets: Linear Over-parameterization to Train Compact Convolutional
    Networks", NeurIPS 2020.
    Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023.
    Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import primitives
from repsqueeze.core.algebra import CONV_CLASSES
from repsqueeze.core.blocks import Parallel, Squeezable, SqueezableBlock

NormLayer = Callable[[int], nn.Module]
_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _building(deployed: bool):
    """Branches of a block built in deployed form live on the meta device: never allocated."""
    return torch.device("meta") if deployed else contextlib.nullcontext()


def conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, ...],
    dims: int = 2,
    stride: int = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> nn.Module:
    """A bias-free ``ConvNd`` (a norm or a later conv supplies the bias)."""
    return CONV_CLASSES[dims](
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=False, padding_mode=padding_mode,
    )  # fmt: skip


def conv_norm(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, ...],
    dims: int = 2,
    stride: int = 1,
    padding: int | tuple[int, ...] | str = 0,
    dilation: int = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    norm_layer: NormLayer | None = None,
) -> nn.Sequential:
    """``ConvNd`` (no bias) followed by a norm layer, as a nested chain."""
    norm_layer = norm_layer or _NORMS[dims]
    layer = conv(
        in_channels, out_channels, kernel_size, dims, stride, padding, dilation, groups,
        padding_mode,
    )  # fmt: skip
    return nn.Sequential(layer, norm_layer(out_channels))


def centered_padding(kernel_size: int, dilation: int, stride: int) -> int | str:
    """Padding that keeps a ``kernel_size`` conv aligned with a 1x1 conv of padding 0."""
    span = dilation * (kernel_size - 1)
    if span % 2 == 0:
        return span // 2
    if stride == 1:
        return "same"
    raise ValueError(
        f"kernel_size={kernel_size} with dilation={dilation} has no centre: an even window "
        f"can only be aligned with padding='same', which PyTorch allows for stride 1, not {stride}"
    )


def _along(axis: int, value: int, other: int, dims: int) -> tuple[int, ...]:
    """``value`` on spatial ``axis``, ``other`` on the remaining ones."""
    return tuple(value if d == axis else other for d in range(dims))


# --- a block from an existing conv + BatchNorm: ``from_conv_bn`` of every kind ----------------
def _check_conv_bn(conv: nn.Module, bn: nn.Module) -> None:
    """Refuses a conv + BatchNorm pair a block cannot take over exactly.

    Raises:
        ValueError: naming the rule broken (the reason :func:`repsqueeze.expand` reports).
    """
    if not isinstance(conv, tuple(CONV_CLASSES.values())):
        raise ValueError(f"{type(conv).__name__} is not a Conv1d/2d/3d")
    k, dims = conv.kernel_size, len(conv.kernel_size)
    if len(set(k)) != 1 or k[0] % 2 == 0:
        raise ValueError(f"kernel {tuple(k)} is not square and odd")
    if set(conv.dilation) != {1}:
        raise ValueError(f"dilation {conv.dilation} (blocks are built with dilation 1)")
    if len(set(conv.stride)) != 1:
        raise ValueError(f"stride {conv.stride} differs between axes")
    if primitives.conv_padding(conv) != ((k[0] // 2, k[0] // 2),) * dims:
        raise ValueError(f"padding {conv.padding} is not centred (k // 2)")
    if not isinstance(bn, _BatchNorm) or bn.num_features != conv.out_channels:
        raise ValueError(f"{type(bn).__name__} after it is not a BatchNorm of its channels")
    if bn.running_mean is None:
        raise ValueError("the BatchNorm after it has no running statistics")


def _built_like(cls: type, conv: nn.Module, bn: _BatchNorm, kwargs: dict) -> Squeezable:
    """A block of ``cls`` with the geometry of ``conv`` and norms with ``bn``'s eps/momentum."""
    _check_conv_bn(conv, bn)
    dims = conv.weight.dim() - 2
    norm = nn.SyncBatchNorm if isinstance(bn, nn.SyncBatchNorm) else _NORMS[dims]
    kwargs = {"norm_layer": partial(norm, eps=bn.eps, momentum=bn.momentum), **kwargs}
    block = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size[0], stride=conv.stride[0],
        groups=conv.groups, padding_mode=conv.padding_mode, dims=dims, **kwargs,
    )  # fmt: skip
    block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    return block.train(conv.training)


@torch.no_grad()
def load_norm(dst: _BatchNorm, bn: _BatchNorm, shift: torch.Tensor | None = None) -> None:
    """``dst`` takes ``bn``'s statistics, affine parameters, eps and momentum (only the
    BatchNorm part of a norm + activation module); ``shift`` (a conv bias before ``bn``) is
    folded into the running mean: ``bn(y + shift) == dst(y)``."""
    dst.eps, dst.momentum = bn.eps, bn.momentum
    dst.running_mean.copy_(bn.running_mean)
    dst.running_var.copy_(bn.running_var)
    dst.num_batches_tracked.copy_(bn.num_batches_tracked)
    if shift is not None:
        dst.running_mean.sub_(shift)
    if dst.affine:
        dst.weight.copy_(bn.weight if bn.affine else torch.ones_like(dst.weight))
        dst.bias.copy_(bn.bias if bn.affine else torch.zeros_like(dst.bias))


@torch.no_grad()
def _take_over(main: nn.Module, conv: nn.Module, bn: _BatchNorm) -> None:
    """The ``(conv, norm)`` pair ``main`` computes ``bn(conv(x))``."""
    main[0].weight.copy_(conv.weight)
    load_norm(main[1], bn, conv.bias)


class _BranchesFromConvBN:
    """``from_conv_bn`` of the blocks whose branch 0 is conv -> BN (ACNet, DBB, MobileOne):
    branch 0 takes over ``bn(conv(x))``; every other branch ends in a BatchNorm with zero
    scale and shift, so it adds zero in eval and in training mode alike."""

    @classmethod
    @torch.no_grad()
    def from_conv_bn(cls, conv: nn.Module, bn: _BatchNorm, **kwargs) -> Parallel:
        """A block computing ``bn(conv(x))`` exactly (eval and training mode): ``conv``'s
        weights (its bias folded into the statistics) and ``bn``'s statistics, eps and
        momentum on the main path; the other branches end in a BatchNorm with zero scale and shift.

        Args:
            conv: a ``ConvNd`` with a square, odd kernel, dilation 1 and centred padding.
            bn: the ``BatchNormNd`` after it (the BatchNorm part of a norm + act module).
            **kwargs: further constructor arguments (``mode``, ``internal_channels``, ...).

        Raises:
            ValueError: a pair the block cannot take over, with the reason.
        """
        block = _built_like(cls, conv, bn, kwargs)
        main, *others = block.branches
        _take_over(main, conv, bn)
        for branch in others:
            last = [m for m in branch.modules() if isinstance(m, _BatchNorm)][-1]
            last.weight.zero_()
            last.bias.zero_()
        return block


def _embed_chain(convs: list[nn.Module], weight: torch.Tensor) -> None:
    """Weights for a chain of bias-free convs that composes exactly to ``weight``.

    1x1 layers pass channels through (identity on the first channels); 3x3 layers before
    the last spatial one build shifted copies of the input, the last spatial one mixes
    them with ``weight``'s taps.
    """
    c_out, c_in, *k = weight.shape
    spatial = [i for i, c in enumerate(convs) if c.kernel_size[0] > 1]
    # the mixing layer: the last spatial one, else the middle of a 1x1 chain, so that the
    # identity layers around it are at least as wide as what they pass through
    mix = spatial[-1] if spatial else (len(convs) - 1) // 2
    shifts = [(0,) * len(k)]  # offsets carried by the channel groups after each layer
    for i, c in enumerate(convs):
        c.weight.zero_()
        if c.bias is not None:
            c.bias.zero_()
        if i == mix:
            _mix(c.weight, weight, shifts)
            shifts = None
        elif c.kernel_size[0] == 1:
            n = c_in * len(shifts) if shifts is not None else c_out
            idx = torch.arange(n)
            c.weight[(idx, idx, *([0] * len(k)))] = 1
        else:
            shifts = _shift(c.weight, c_in, shifts)


def _shift(w: torch.Tensor, c_in: int, shifts: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """A 3x3 layer turning channel groups at ``shifts`` into groups at every offset + tap."""
    extent = max(s[0] for s in shifts) + 2
    new = list(itertools.product(range(extent + 1), repeat=len(shifts[0])))
    for j, q in enumerate(new):
        u = tuple(min(v, 2) for v in q)
        p = tuple(v - t for v, t in zip(q, u, strict=True))
        src = shifts.index(p)
        for c in range(c_in):
            w[(j * c_in + c, src * c_in + c, *u)] = 1
    return new


def _mix(w: torch.Tensor, weight: torch.Tensor, shifts: list[tuple[int, ...]]) -> None:
    """The layer that sums ``weight``'s taps from channel groups at ``shifts``."""
    c_out, c_in, *k = weight.shape
    kw = w.shape[2]
    if shifts == [(0,) * len(k)] and kw == k[0]:
        w[:c_out, :c_in] = weight
        return
    for q in itertools.product(range(k[0]), repeat=len(k)):
        u = tuple(min(v, kw - 1) for v in q)
        src = shifts.index(tuple(v - t for v, t in zip(q, u, strict=True)))
        w[(slice(0, c_out), slice(src * c_in, (src + 1) * c_in), *u)] = weight[
            (slice(None), slice(None), *q)
        ]


class ConvBN(SqueezableBlock):
    """k x k conv (no bias) followed by BN: the plain, un-re-parameterized baseline.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size along every spatial dim.
        stride: stride.
        dilation: dilation.
        groups: groups.
        padding_mode: padding mode.
        dims: 1, 2 or 3 spatial dims.
        norm_layer: norm constructor (default ``BatchNorm{dims}d``).
        deployed: build the single convolution directly.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        dims: int = 2,
        norm_layer: NormLayer | None = None,
        deployed: bool = False,
        mode: str = "chain",
    ) -> None:
        with _building(deployed):
            layers = conv_norm(
                in_channels, out_channels, kernel_size, dims, stride,
                centered_padding(kernel_size, dilation, stride), dilation, groups, padding_mode,
                norm_layer,
            )  # fmt: skip
        super().__init__(*layers, deployed=deployed, mode=mode)

    @classmethod
    def from_conv_bn(cls, conv: nn.Module, bn: _BatchNorm, **kwargs) -> ConvBN:
        """A block computing ``bn(conv(x))`` exactly (eval and training mode): ``conv``'s
        weights (its bias folded into the statistics) and ``bn``'s statistics, eps and
        momentum on the main path.

        Args:
            conv: a ``ConvNd`` with a square, odd kernel, dilation 1 and centred padding.
            bn: the ``BatchNormNd`` after it (the BatchNorm part of a norm + act module).
            **kwargs: further constructor arguments (``mode``, ...).

        Raises:
            ValueError: a pair the block cannot take over, with the reason.
        """
        block = _built_like(cls, conv, bn, kwargs)
        _take_over(block.layers, conv, bn)
        return block


class ACBlock(_BranchesFromConvBN, Parallel):
    """k x k conv-BN plus one asymmetric conv-BN per spatial axis, summed (ACNet).

    The asymmetric branch of axis ``d`` has kernel ``k`` along ``d`` and 1 elsewhere (1 x k
    and k x 1 in 2-D), centred on the square kernel. In 1-D it coincides with the square one.

    Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric
    Convolution Blocks", ICCV 2019.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size of the square branch.
        stride: stride of every branch.
        dilation: dilation of every branch.
        groups: groups of every branch.
        padding_mode: padding mode of every branch.
        dims: 1, 2 or 3 spatial dims.
        norm_layer: norm constructor (default ``BatchNorm{dims}d``).
        deployed: build the single convolution directly.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        dims: int = 2,
        norm_layer: NormLayer | None = None,
        deployed: bool = False,
        mode: str = "chain",
    ) -> None:
        padding = centered_padding(kernel_size, dilation, stride)
        common = {
            "dims": dims, "stride": stride, "dilation": dilation, "groups": groups,
            "padding_mode": padding_mode, "norm_layer": norm_layer,
        }  # fmt: skip
        with _building(deployed):
            branches = [
                conv_norm(in_channels, out_channels, kernel_size, padding=padding, **common)
            ]
            for axis in range(dims):
                axis_padding = (
                    padding if isinstance(padding, str) else _along(axis, padding, 0, dims)
                )
                kernel = _along(axis, kernel_size, 1, dims)
                branches.append(
                    conv_norm(in_channels, out_channels, kernel, padding=axis_padding, **common)
                )
        super().__init__(*branches, deployed=deployed, mode=mode)


class DiverseBranchBlock(_BranchesFromConvBN, Parallel):
    """k x k, 1x1, 1x1 -> k x k and 1x1 -> average-pool branches, each with BN, summed (DBB).

    As in DBB, the 1x1 branch and the 1x1 conv of the pooling branch are left out for a
    depthwise block (``groups == out_channels``), where they would only rescale channels;
    the pooling branch keeps its 1x1 whenever it must change the channel count. The
    1x1 -> k x k chain needs no BN-and-pad layer: the block pads its input once, so the
    1x1 conv and its BN see the border too (border-consistent padding).

    Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like Unit",
    CVPR 2021.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size of the k x k convs and of the average pool.
        stride: stride of the k x k convs, the 1x1 branch and the average pool.
        groups: groups of every convolution.
        padding_mode: only ``'zeros'``: average pooling pads with zeros.
        dims: 1, 2 or 3 spatial dims.
        norm_layer: norm constructor (default ``BatchNorm{dims}d``).
        internal_channels: width of the 1x1 -> k x k chain; ``None``: ``in_channels``, or
            ``2 * in_channels`` for a depthwise block (as in DBB). With ``in_channels``, the
            chain's 1x1 starts as the identity (DBB's ``IdentityBasedConv1x1``).
        deployed: build the single convolution directly.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        dims: int = 2,
        norm_layer: NormLayer | None = None,
        internal_channels: int | None = None,
        deployed: bool = False,
        mode: str = "chain",
    ) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(
                f"DiverseBranchBlock needs an odd kernel_size, got {kernel_size}: its average "
                "pool can only be centred on the k x k kernel with symmetric padding"
            )
        if padding_mode != "zeros":
            raise ValueError(
                f"DiverseBranchBlock pads with zeros only (got padding_mode={padding_mode!r}): "
                "its average pool pads with zeros, and a block pads once with one mode"
            )
        norm_layer = norm_layer or _NORMS[dims]
        depthwise = groups == out_channels
        if internal_channels is None:
            internal_channels = 2 * in_channels if depthwise else in_channels
        padding = kernel_size // 2
        common = {"dims": dims, "groups": groups, "norm_layer": norm_layer}
        kxk = {"stride": stride, "padding": padding, **common}
        with _building(deployed):
            branches = [conv_norm(in_channels, out_channels, kernel_size, **kxk)]
            if not depthwise:
                branches.append(conv_norm(in_channels, out_channels, 1, stride=stride, **common))
            chain = nn.Sequential(
                *conv_norm(in_channels, internal_channels, 1, **common),
                *conv_norm(internal_channels, out_channels, kernel_size, **kxk),
            )
            branches.append(chain)
            keeps_channels = depthwise and in_channels == out_channels
            squeeze = (
                [] if keeps_channels else list(conv_norm(in_channels, out_channels, 1, **common))
            )
            pool = _POOLS[dims](kernel_size, stride, padding)
            branches.append(nn.Sequential(*squeeze, pool, norm_layer(out_channels)))
        if internal_channels == in_channels and not deployed:
            with torch.no_grad():  # DBB's IdentityBasedConv1x1: the chain's 1x1 starts as identity
                weight = chain[0].weight.zero_()  # (in, in // groups, 1, ...)
                idx = torch.arange(in_channels)
                weight[(idx, idx % weight.shape[1], *([0] * dims))] = 1
        super().__init__(*branches, deployed=deployed, mode=mode)


class MobileOneBlock(_BranchesFromConvBN, Parallel):
    """``n`` k x k conv-BN + 1x1 conv-BN (scale) + identity BN (when shapes allow), summed.

    Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: size of the k x k branches.
        stride: stride of every branch.
        dilation: dilation of the k x k branches.
        groups: groups of every convolution.
        padding_mode: padding mode of the k x k branches.
        dims: 1, 2 or 3 spatial dims.
        norm_layer: norm constructor (default ``BatchNorm{dims}d``).
        num_conv_branches: number ``n >= 1`` of parallel k x k conv-BN branches.
        use_scale: add the 1x1 conv-BN branch; ``None`` adds it for ``kernel_size > 1``
            (a 1x1 block's conv branches are already 1x1, as in MobileOne).
        use_identity: add the BN-only branch; ``None`` adds it when in/out channels match
            and stride is 1.
        deployed: build the single convolution directly.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        dims: int = 2,
        norm_layer: NormLayer | None = None,
        num_conv_branches: int = 1,
        use_scale: bool | None = None,
        use_identity: bool | None = None,
        deployed: bool = False,
        mode: str = "chain",
    ) -> None:
        if num_conv_branches < 1:
            raise ValueError(f"num_conv_branches must be at least 1, got {num_conv_branches}")
        if use_identity is None:
            use_identity = in_channels == out_channels and stride == 1
        if use_scale is None:
            use_scale = kernel_size > 1
        common = {"dims": dims, "stride": stride, "groups": groups, "norm_layer": norm_layer}
        kxk = {
            "padding": centered_padding(kernel_size, dilation, stride), "dilation": dilation,
            "padding_mode": padding_mode, **common,
        }  # fmt: skip
        with _building(deployed):
            branches = [
                conv_norm(in_channels, out_channels, kernel_size, **kxk)
                for _ in range(num_conv_branches)
            ]
            if use_scale:
                branches.append(conv_norm(in_channels, out_channels, 1, **common))
            if use_identity:
                branches.append((norm_layer or _NORMS[dims])(out_channels))
        super().__init__(*branches, deployed=deployed, mode=mode)


class RepVGGBlock(MobileOneBlock):
    """k x k conv-BN + 1x1 conv-BN + identity BN (when shapes allow), summed.

    A :class:`MobileOneBlock` with one k x k branch.

    Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: size of the main branch.
        stride: stride of every branch.
        dilation: dilation of the main branch.
        groups: groups of both convolutions.
        padding_mode: padding mode of the main branch.
        use_identity: add the BN-only branch; ``None`` adds it when in/out channels match
            and stride is 1.
        use_1x1: add the 1x1 branch.
        dims: 1, 2 or 3 spatial dims.
        norm_layer: norm constructor (default ``BatchNorm{dims}d``).
        deployed: build the single convolution directly.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        use_identity: bool | None = None,
        use_1x1: bool = True,
        dims: int = 2,
        norm_layer: NormLayer | None = None,
        deployed: bool = False,
        mode: str = "chain",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, dilation, groups, padding_mode,
            dims, norm_layer, num_conv_branches=1, use_scale=use_1x1, use_identity=use_identity,
            deployed=deployed, mode=mode,
        )  # fmt: skip


class ExpandedConv(SqueezableBlock):
    """A k x k conv expanded into a linear chain of convs, then BN (ExpandNets).

    * ``'cl'``: 1x1 (in -> e*in) -> k x k (-> e*out) -> 1x1 (-> out);
    * ``'ck'``: ``(k - 1) // 2`` 3x3 convs with ``e*out`` hidden channels, the stride on the
      last 3x3 (so the window stays k x k); a single 3x3 (k = 3) or none (k = 1) is followed
      by a 1x1 to ``out``, so the chain always has a hidden layer.

    No BN or activation between the convs; every conv has ``groups``, so the squeezed conv
    keeps them.

    Guo et al., "ExpandNets: Linear Over-parameterization to Train Compact Convolutional
    Networks", NeurIPS 2020.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size of the squeezed conv (odd for ``'ck'``).
        stride: stride of the squeezed conv.
        groups: groups of every conv.
        padding_mode: padding mode of the padded convs.
        dims: 1, 2 or 3 spatial dims.
        norm_layer: norm constructor (default ``BatchNorm{dims}d``).
        expand_mode: ``'ck'`` (expand the kernel) or ``'cl'`` (expand the channels).
        expansion: channel expansion rate ``e``.
        deployed: build the single convolution directly.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        dims: int = 2,
        norm_layer: NormLayer | None = None,
        expand_mode: str = "ck",
        expansion: int = 4,
        deployed: bool = False,
        mode: str = "chain",
    ) -> None:
        if expand_mode == "cl":
            padding = centered_padding(kernel_size, 1, stride)
            kernels = [1, kernel_size, 1]
            channels = [
                in_channels,
                expansion * in_channels,
                expansion * out_channels,
                out_channels,
            ]
            paddings, strides = [0, padding, 0], [1, stride, 1]
        elif expand_mode == "ck":
            if kernel_size % 2 == 0:
                raise ValueError(
                    f"expand_mode='ck' builds a k x k kernel from 3x3 convs and needs an odd "
                    f"kernel_size, got {kernel_size}"
                )
            n = kernel_size // 2
            kernels = [3] * n + [1] * max(0, 2 - n)
            hidden = expansion * out_channels
            channels = [in_channels] + [hidden] * (len(kernels) - 1) + [out_channels]
            paddings = [k // 2 for k in kernels]
            strides = [stride if i == max(n - 1, 0) else 1 for i in range(len(kernels))]
        else:
            raise ValueError(f"expand_mode must be 'ck' or 'cl', got {expand_mode!r}")
        with _building(deployed):
            layers = [
                conv(c_in, c_out, k, dims, s, p, groups=groups, padding_mode=padding_mode)
                for c_in, c_out, k, s, p in zip(
                    channels, channels[1:], kernels, strides, paddings, strict=False
                )
            ]
            layers.append((norm_layer or _NORMS[dims])(out_channels))
        super().__init__(*layers, deployed=deployed, mode=mode)

    @classmethod
    @torch.no_grad()
    def from_conv_bn(cls, conv: nn.Module, bn: _BatchNorm, **kwargs) -> ExpandedConv:
        """A chain computing ``bn(conv(x))`` exactly: the convs embed ``conv``'s kernel
        (1x1 layers pass channels through, the 3x3 layers of ``'ck'`` build shifted copies
        of the input, one layer mixes them with ``conv``'s taps), the BatchNorm is ``bn``.

        Args:
            conv: a ``ConvNd`` with a square, odd kernel, dilation 1, centred padding and
                ``groups=1``.
            bn: the ``BatchNormNd`` after it.
            **kwargs: further constructor arguments (``expand_mode``, ``expansion``, ...).

        Raises:
            ValueError: for ``groups > 1``, or when the hidden layers of ``'ck'`` are too
                narrow to hold the shifted copies a kernel above 3 needs.
        """
        _check_conv_bn(conv, bn)
        if conv.groups != 1:
            raise ValueError("ExpandNets blocks start from an exact embedding only for groups=1")
        k, dims = conv.kernel_size[0], conv.weight.dim() - 2
        hidden = kwargs.get("expansion", 4) * conv.out_channels
        need = conv.in_channels * (k - 2) ** dims
        if kwargs.get("expand_mode", "ck") == "ck" and k >= 5 and hidden < need:
            raise ValueError(
                f"expand_ck needs >= {need} hidden channels for an exact start, has {hidden} "
                f"(expansion * out_channels); raise expansion"
            )
        block = _built_like(cls, conv, bn, kwargs)
        *convs, norm = block.layers
        _embed_chain(list(convs), conv.weight)
        load_norm(norm, bn, conv.bias)
        return block


class QARepVGGBlock(SqueezableBlock):
    """QARepVGG: (k x k conv-BN + 1x1 conv + identity), summed, then one BatchNorm.

    RepVGG's folded kernel quantizes badly: the BN of the identity and 1x1 branches
    rescales those branches per channel by ``gamma / sigma``, which gives the folded kernel
    outlier channels and enlarges the output variance. QARepVGG removes the BN of the
    identity and 1x1 branches, keeps the one of the k x k branch (without it training is
    unstable, as the paper's ablation shows) and puts one BN after the sum, which controls
    the variance; all of it still folds into one convolution.

    Following the official implementation (``QARepVGGBlockV2``, "the default implementation
    for QARepVGG") and YOLOv6, the 1x1 conv has no bias by default: before the trailing BN a
    per-channel constant is removed by the batch mean in training, so such a bias gets zero
    gradient and folds away (``bias_1x1=True`` adds it anyway, e.g. to load weights of
    implementations that have it). The paper's other rule is for training, not structure:
    ordinary weight decay on every weight, not RepVGG's custom L2 on the equivalent kernel.

    With ``mode="online"`` the trailing BN runs after the composed convolution, but the
    k x k branch's BN cannot be folded while it normalises with batch statistics: online
    training needs ``make_block("qarepvgg", ..., online_norm=True)`` (that BN becomes a
    channel scale); in eval mode online works as it is.

    Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: size of the main branch.
        stride: stride of every branch.
        dilation: dilation of the main branch.
        groups: groups of both convolutions.
        padding_mode: padding mode of the main branch.
        use_identity: add the identity branch; ``None`` adds it when in/out channels match
            and stride is 1.
        bias_1x1: give the 1x1 conv a bias.
        dims: 1, 2 or 3 spatial dims.
        norm_layer: norm constructor (default ``BatchNorm{dims}d``), for the main branch's
            norm and the one after the sum.
        deployed: build the single convolution directly.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        use_identity: bool | None = None,
        bias_1x1: bool = False,
        dims: int = 2,
        norm_layer: NormLayer | None = None,
        deployed: bool = False,
        mode: str = "chain",
    ) -> None:
        if use_identity is None:
            use_identity = in_channels == out_channels and stride == 1
        norm_layer = norm_layer or _NORMS[dims]
        with _building(deployed):
            branches = [
                conv_norm(
                    in_channels, out_channels, kernel_size, dims, stride,
                    centered_padding(kernel_size, dilation, stride), dilation, groups,
                    padding_mode, norm_layer,
                ),
                CONV_CLASSES[dims](
                    in_channels, out_channels, 1, stride=stride, groups=groups, bias=bias_1x1
                ),
            ]  # fmt: skip
            if use_identity:
                branches.append(nn.Identity())
            layers = [Parallel(*branches), norm_layer(out_channels)]
        super().__init__(*layers, deployed=deployed, mode=mode)


BLOCKS: dict[str, Callable[..., Squeezable]] = {
    "plain": ConvBN,
    "repvgg": RepVGGBlock,
    "acb": ACBlock,
    "dbb": DiverseBranchBlock,
    "mobileone": MobileOneBlock,
    "expand_ck": partial(ExpandedConv, expand_mode="ck"),
    "expand_cl": partial(ExpandedConv, expand_mode="cl"),
    "qarepvgg": QARepVGGBlock,
}


def channel_scale(num_features: int, dims: int = 2) -> nn.Module:
    """A learnable per-channel scale (a depthwise 1x1 conv, initialised to 1).

    The linear stand-in for BatchNorm in the OREPA-style variant (Hu et al., "Online
    Convolutional Re-parameterization", CVPR 2022): unlike batch statistics it folds into
    the composed kernel inside the forward pass.
    """
    scale = CONV_CLASSES[dims](num_features, num_features, 1, groups=num_features, bias=False)
    nn.init.ones_(scale.weight)
    return scale


def make_block(
    kind: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    dims: int = 2,
    deployed: bool = False,
    mode: str = "chain",
    online_norm: bool = False,
    **kwargs,
) -> Squeezable:
    """Builds a block of any kind; all kinds deploy to the same convolution.

    For odd ``kernel_size`` the deployed form is always
    ``ConvNd(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
    groups=groups, bias=True)``.

    Args:
        kind: one of :data:`BLOCKS` (``plain``, ``repvgg``, ``acb``, ``dbb``, ``mobileone``,
            ``expand_ck``, ``expand_cl``, ``qarepvgg``).
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size of the deployed conv.
        stride: stride of the deployed conv.
        groups: groups of the deployed conv.
        dims: 1, 2 or 3 spatial dims.
        deployed: build the single convolution directly.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
        online_norm: the OREPA-style variant: every BatchNorm inside the block becomes a
            learnable channel scale (:func:`channel_scale`) and one BatchNorm follows the
            block, so ``mode="online"`` can compose every branch while training.
        **kwargs: further arguments of the block's constructor (``norm_layer``, ...).
    """
    if kind not in BLOCKS:
        raise ValueError(f"unknown block kind {kind!r}; valid kinds: {', '.join(BLOCKS)}")
    for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"make_block: {arg} must be a positive integer, got {value!r}")
    if online_norm:
        norm = kwargs.pop("norm_layer", None) or _NORMS[dims]
        inner = make_block(
            kind, in_channels, out_channels, kernel_size, stride, groups, dims, deployed,
            norm_layer=partial(channel_scale, dims=dims), **kwargs,
        )  # fmt: skip
        with _building(deployed):
            return SqueezableBlock(inner, norm(out_channels), deployed=deployed, mode=mode)
    return BLOCKS[kind](
        in_channels, out_channels, kernel_size=kernel_size, stride=stride, groups=groups,
        dims=dims, deployed=deployed, mode=mode, **kwargs,
    )  # fmt: skip
