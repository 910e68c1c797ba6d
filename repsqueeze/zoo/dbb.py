"""The Diverse Branch Block: k x k, 1x1, 1x1 -> k x k and 1x1 -> average-pool branches.

Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like Unit",
CVPR 2021.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from repsqueeze.blocks import Parallel
from repsqueeze.zoo.embedding import BranchesFromConvBN
from repsqueeze.zoo.layers import POOLS, BlockArgs


class DiverseBranchBlock(BranchesFromConvBN, Parallel):
    """k x k, 1x1, 1x1 -> k x k and 1x1 -> average-pool branches, each with BN, summed (DBB).

    As in DBB, the 1x1 branch and the 1x1 conv of the pooling branch are left out for a
    depthwise block (``groups == out_channels``), where they would only rescale channels;
    the pooling branch keeps its 1x1 whenever it must change the channel count. The
    1x1 -> k x k chain needs no BN-and-pad layer: the block pads its input once, so the
    1x1 conv and its BN see the border too (border-consistent padding). The stride is on
    the k x k convs, the 1x1 branch and the average pool; the block pads with zeros and has
    dilation 1 (its average pool has no other form).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size of the k x k convs and of the average pool.
        stride: stride of the block (of its deployed convolution).
        internal_channels: width of the 1x1 -> k x k chain; ``None``: ``in_channels``, or
            ``2 * in_channels`` for a depthwise block (as in DBB). With ``in_channels``, the
            chain's 1x1 starts as the identity (DBB's ``IdentityBasedConv1x1``).
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.BlockArgs`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        internal_channels: int | None = None,
        **shared: Any,
    ) -> None:
        args = BlockArgs.of(type(self).__name__, {"stride": stride, **shared})
        _check(kernel_size, args)
        depthwise = args.groups == out_channels
        if internal_channels is None:
            internal_channels = 2 * in_channels if depthwise else in_channels
        padding, stride = kernel_size // 2, args.stride
        with args.building():
            branches = [args.main(in_channels, out_channels, kernel_size)]
            if not depthwise:
                branches.append(args.conv_norm(in_channels, out_channels, 1, stride))
            chain = nn.Sequential(
                *args.conv_norm(in_channels, internal_channels, 1),
                *args.conv_norm(internal_channels, out_channels, kernel_size, stride, padding),
            )
            branches.append(chain)
            keeps_channels = depthwise and in_channels == out_channels
            squeeze = [] if keeps_channels else [*args.conv_norm(in_channels, out_channels, 1)]
            pool = POOLS[args.dims](kernel_size, stride, padding)
            branches.append(nn.Sequential(*squeeze, pool, args.norm(out_channels)))
        if internal_channels == in_channels and not args.deployed:
            with torch.no_grad():  # DBB's IdentityBasedConv1x1: the chain's 1x1 starts as identity
                weight = chain[0].weight.zero_()  # (in, in // groups, 1, ...)
                idx = torch.arange(in_channels)
                weight[(idx, idx % weight.shape[1], *([0] * args.dims))] = 1
        super().__init__(*branches, deployed=args.deployed, mode=args.mode)


def _check(kernel_size: int, args: BlockArgs) -> None:
    if kernel_size % 2 == 0:
        raise ValueError(
            f"DiverseBranchBlock needs an odd kernel_size, got {kernel_size}: its average "
            "pool can only be centred on the k x k kernel with symmetric padding"
        )
    if args.padding_mode != "zeros":
        raise ValueError(
            f"DiverseBranchBlock pads with zeros only (got padding_mode={args.padding_mode!r}): "
            "its average pool pads with zeros, and a block pads once with one mode"
        )
    args.require("DiverseBranchBlock", dilation=1)
