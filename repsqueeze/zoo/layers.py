"""The layers every block of the zoo is made of, and the arguments all blocks share.

:class:`BlockArgs` declares the shared constructor arguments once (stride, dilation, groups,
padding mode, spatial dims, norm layer, deployed form, run mode) and builds the conv and
norm layers from them, as timm's ``LayerFn`` does for its blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core.algebra import CONV_CLASSES

NormLayer = Callable[[int], nn.Module]
GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride")  # the positional ones
NORMS: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOLS: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


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
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    cls = CONV_CLASSES[dims]
    return cls(
        in_channels, out_channels, kernel_size, **geometry, bias=False, padding_mode=padding_mode
    )


def conv_norm(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, ...],
    *args: Any,
    norm_layer: NormLayer | None = None,
    **kwargs: Any,
) -> nn.Sequential:
    """:func:`conv` (its further arguments: ``dims``, ``stride``, ...) followed by a norm layer
    (default ``BatchNorm{dims}d``), as a nested chain."""
    layer = conv(in_channels, out_channels, kernel_size, *args, **kwargs)
    norm = norm_layer or NORMS[layer.weight.dim() - 2]
    return nn.Sequential(layer, norm(out_channels))


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


def channel_scale(num_features: int, dims: int = 2) -> nn.Module:
    """A learnable per-channel scale (a depthwise 1x1 conv, initialised to 1).

    The linear stand-in for BatchNorm in the OREPA-style variant (Hu et al., "Online
    Convolutional Re-parameterization", CVPR 2022): unlike batch statistics it folds into
    the composed kernel inside the forward pass.
    """
    scale = CONV_CLASSES[dims](num_features, num_features, 1, groups=num_features, bias=False)
    nn.init.ones_(scale.weight)
    return scale


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


@dataclass(frozen=True)
class BlockArgs:
    """The constructor arguments every block of the zoo takes, declared once: its geometry
    and the shared keywords.

    A block's signature is ``(in_channels, out_channels, kernel_size=3, stride=1, *, own
    arguments, **shared)`` (:class:`ZooBlock`): ``shared`` are these, ``stride`` may also
    come fourth.

    Attributes:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size of the deployed convolution.
        stride: stride of the block (of its deployed convolution).
        dilation: dilation of the k x k convolutions.
        groups: groups of every convolution.
        padding_mode: padding mode of the padded convolutions.
        dims: 1, 2 or 3 spatial dims.
        norm_layer: norm constructor (default ``BatchNorm{dims}d``).
        deployed: build the single convolution directly (the training branches are never
            allocated).
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
    """

    in_channels: int = 1
    out_channels: int = 1
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    padding_mode: str = "zeros"
    dims: int = 2
    norm_layer: NormLayer | None = None
    deployed: bool = False
    mode: str = "chain"

    def __post_init__(self) -> None:
        if self.dims not in NORMS:
            raise ValueError(f"dims must be 1, 2 or 3 spatial dims, got {self.dims!r}")

    @classmethod
    def of(cls, owner: str, geometry: Mapping[str, int], shared: Mapping[str, Any]) -> BlockArgs:
        """The arguments of an ``owner`` block; a shared name that is none of them is
        refused as Python refuses an unexpected keyword argument."""
        names = {f.name for f in dataclasses.fields(cls)} - set(GEOMETRY)
        for name in shared:
            if name not in names:
                raise TypeError(f"{owner} got an unexpected keyword argument {name!r}")
        return cls(**geometry, **shared)

    def building(self) -> contextlib.AbstractContextManager:
        """Where a block builds its branches: on the meta device (never allocated) when it
        is built deployed."""
        return torch.device("meta") if self.deployed else contextlib.nullcontext()

    def norm(self, channels: int) -> nn.Module:
        """A norm layer of ``channels`` channels."""
        return (self.norm_layer or NORMS[self.dims])(channels)

    def conv(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding=0
    ) -> nn.Module:
        """A bias-free conv with the block's groups and padding mode, dilation 1."""
        return conv(
            in_channels,
            out_channels,
            kernel_size,
            self.dims,
            stride,
            padding,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )

    def conv_norm(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int = 1,
        padding_mode: str = "zeros",
    ) -> nn.Sequential:
        """Conv (the block's groups) -> the block's norm."""
        geometry = (self.dims, stride, padding, dilation, self.groups, padding_mode)
        layer = conv(in_channels, out_channels, kernel_size, *geometry)
        return nn.Sequential(layer, self.norm(out_channels))

    def main(self) -> nn.Sequential:
        """The k x k conv-norm of the block: its channels, stride, dilation and padding
        mode, centred."""
        padding = centered_padding(self.kernel_size, self.dilation, self.stride)
        return self.conv_norm(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            padding,
            self.dilation,
            self.padding_mode,
        )

    def require(self, owner: str, **allowed: Any) -> None:
        """Refuses shared arguments a block family has no form for (``dilation=1``, ...)."""
        for name, value in allowed.items():
            if getattr(self, name) != value:
                raise ValueError(
                    f"{owner} is built with {name}={value!r} only, got {getattr(self, name)!r}"
                )


class _ClassSignature:
    """``inspect.signature(Block)``: the shared constructor with the family's own arguments.
    Instances have none (theirs is that of ``forward``)."""

    def __get__(self, obj: Any, cls: type) -> inspect.Signature:
        if obj is not None:
            raise AttributeError("__signature__")
        shared = list(inspect.signature(ZooBlock.__init__).parameters.values())
        own = list(inspect.signature(cls.parts).parameters.values())[2:]
        return inspect.Signature([*shared[1:5], *own, shared[-1]])


class ZooBlock:
    """The constructor every block of the zoo shares:
    ``Block(in_channels, out_channels, kernel_size=3, stride=1, *, own arguments, **shared)``
    with ``shared`` the arguments of :class:`BlockArgs`.

    A family defines :meth:`parts` (its branches or layers, from the geometry, the shared
    arguments and its own keyword arguments); the constructor builds them (on the meta
    device when deployed) and hands them to the combinator that follows in the class's
    bases (``Parallel`` or ``SqueezableBlock``), as timm's byobnet blocks take ``LayerFn``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size of the deployed convolution.
        stride: stride of the block (may also be given by name).
        **shared: the family's own arguments, then those of :class:`BlockArgs` (``groups``,
            ``dilation``, ``padding_mode``, ``dims``, ``norm_layer``, ``deployed``, ``mode``).
    """

    __signature__ = _ClassSignature()

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, **shared
    ) -> None:
        names = list(inspect.signature(self.parts).parameters)[1:]
        own = {k: v for k, v in shared.items() if k in names}
        rest = {k: v for k, v in shared.items() if k not in names}
        geometry = (in_channels, out_channels, kernel_size, stride)
        args = BlockArgs.of(type(self).__name__, dict(zip(GEOMETRY, geometry, strict=True)), rest)
        with args.building():
            parts = self.parts(args, **own)
        super().__init__(*parts, deployed=args.deployed, mode=args.mode)

    def parts(self, args: BlockArgs) -> list[nn.Module]:
        """The block's branches (a ``Parallel``) or layers (a ``SqueezableBlock``); a family
        adds its own arguments as keywords."""
        raise NotImplementedError
