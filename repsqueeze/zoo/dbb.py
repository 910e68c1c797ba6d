"""The Diverse Branch Block: k x k, 1x1, 1x1 -> k x k and 1x1 -> average-pool branches.

Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like Unit",
CVPR 2021.
"""

from __future__ import annotations

import torch
from torch import nn

from repsqueeze.core.blocks import Parallel
from repsqueeze.zoo.embedding import BranchesFromConvBN
from repsqueeze.zoo.layers import POOLS, BlockArgs, ZooBlock


class DiverseBranchBlock(BranchesFromConvBN, ZooBlock, Parallel):
    """k x k, 1x1, 1x1 -> k x k and 1x1 -> average-pool branches, each with BN, summed (DBB).

    As in DBB, the 1x1 branch and the 1x1 conv of the pooling branch are left out for a
    depthwise block (``groups == out_channels``), where they would only rescale channels;
    the pooling branch keeps its 1x1 whenever it must change the channel count. The
    1x1 -> k x k chain needs no BN-and-pad layer: the block pads its input once, so the
    1x1 conv and its BN see the border too (border-consistent padding). The stride is on
    the k x k convs, the 1x1 branch and the average pool; the block pads with zeros and has
    dilation 1 (its average pool has no other form).

    Args:
        kernel_size: odd kernel size of the k x k convs and of the average pool.
        internal_channels: width of the 1x1 -> k x k chain; ``None``: ``in_channels``, or
            ``2 * in_channels`` for a depthwise block (as in DBB). With ``in_channels``, the
            chain's 1x1 starts as the identity (DBB's ``IdentityBasedConv1x1``).
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.ZooBlock`).
    """

    def parts(
        self,
        args: BlockArgs,
        *,
        internal_channels: int | None = None,
    ) -> list[nn.Module]:
        _check(args)
        depthwise = args.groups == args.out_channels
        if internal_channels is None:
            internal_channels = 2 * args.in_channels if depthwise else args.in_channels
        padding, stride = args.kernel_size // 2, args.stride
        branches = [args.main()]
        if not depthwise:
            branches.append(args.conv_norm(args.in_channels, args.out_channels, 1, stride))
        chain = nn.Sequential(
            *args.conv_norm(args.in_channels, internal_channels, 1),
            *args.conv_norm(
                internal_channels, args.out_channels, args.kernel_size, stride, padding
            ),
        )
        branches.append(chain)
        keeps_channels = depthwise and args.in_channels == args.out_channels
        squeeze = (
            [] if keeps_channels else [*args.conv_norm(args.in_channels, args.out_channels, 1)]
        )
        pool = POOLS[args.dims](args.kernel_size, stride, padding)
        branches.append(nn.Sequential(*squeeze, pool, args.norm(args.out_channels)))
        if internal_channels == args.in_channels and not args.deployed:
            with torch.no_grad():  # DBB's IdentityBasedConv1x1: the chain's 1x1 starts as identity
                weight = chain[0].weight.zero_()  # (in, in // groups, 1, ...)
                idx = torch.arange(args.in_channels)
                weight[(idx, idx % weight.shape[1], *([0] * args.dims))] = 1
        return branches


def _check(args: BlockArgs) -> None:
    if args.kernel_size % 2 == 0:
        raise ValueError(
            f"DiverseBranchBlock needs an odd kernel_size, got {args.kernel_size}: its average "
            "pool can only be centred on the k x k kernel with symmetric padding"
        )
    if args.padding_mode != "zeros":
        raise ValueError(
            f"DiverseBranchBlock pads with zeros only (got padding_mode={args.padding_mode!r}): "
            "its average pool pads with zeros, and a block pads once with one mode"
        )
    args.require("DiverseBranchBlock", dilation=1)
