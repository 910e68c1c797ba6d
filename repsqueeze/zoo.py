"""Re-parameterizable blocks from the literature, each built from the core primitives.

Every block here is linear (a ``Parallel`` or ``SqueezableBlock``) and squeezes into one
convolution; models put the non-linearity between blocks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from repsqueeze.algebra import CONV_CLASSES
from repsqueeze.blocks import Parallel

NormLayer = Callable[[int], nn.Module]
_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _building(deployed: bool):
    """Branches of a block built in deployed form live on the meta device: never allocated."""
    return torch.device("meta") if deployed else contextlib.nullcontext()


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
    conv = CONV_CLASSES[dims](
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=False, padding_mode=padding_mode,
    )  # fmt: skip
    return nn.Sequential(conv, norm_layer(out_channels))


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


class RepVGGBlock(Parallel):
    """k x k conv-BN + 1x1 conv-BN + identity BN (when shapes allow), summed.

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
    ) -> None:
        if use_identity is None:
            use_identity = in_channels == out_channels and stride == 1
        common = {"dims": dims, "stride": stride, "groups": groups, "norm_layer": norm_layer}
        with _building(deployed):
            branches = [
                conv_norm(
                    in_channels,
                    out_channels,
                    kernel_size,
                    dilation=dilation,
                    padding=centered_padding(kernel_size, dilation, stride),
                    padding_mode=padding_mode,
                    **common,
                )  # fmt: skip
            ]
            if use_1x1:
                branches.append(conv_norm(in_channels, out_channels, 1, **common))
            if use_identity:
                branches.append((norm_layer or _NORMS[dims])(out_channels))
        super().__init__(*branches, deployed=deployed)
