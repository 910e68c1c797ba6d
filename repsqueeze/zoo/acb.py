"""ACNet's asymmetric convolution block.

Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric
Convolution Blocks", ICCV 2019.
"""

from __future__ import annotations

from typing import Any

from repsqueeze.blocks import Parallel
from repsqueeze.zoo.embedding import BranchesFromConvBN
from repsqueeze.zoo.layers import BlockArgs, centered_padding


def _along(axis: int, value: int, other: int, dims: int) -> tuple[int, ...]:
    """``value`` on spatial ``axis``, ``other`` on the remaining ones."""
    return tuple(value if d == axis else other for d in range(dims))


class ACBlock(BranchesFromConvBN, Parallel):
    """k x k conv-BN plus one asymmetric conv-BN per spatial axis, summed (ACNet).

    The asymmetric branch of axis ``d`` has kernel ``k`` along ``d`` and 1 elsewhere (1 x k
    and k x 1 in 2-D), centred on the square kernel. In 1-D it coincides with the square one.
    Every branch has the block's stride, dilation, groups and padding mode.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size of the square branch.
        stride: stride of the block (of its deployed convolution).
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.BlockArgs`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        **shared: Any,
    ) -> None:
        args = BlockArgs.of(type(self).__name__, {"stride": stride, **shared})
        square = centered_padding(kernel_size, args.dilation, args.stride)
        with args.building():
            branches = [args.main(in_channels, out_channels, kernel_size)]
            for axis in range(args.dims):
                padding = square if isinstance(square, str) else _along(axis, square, 0, args.dims)
                branches.append(
                    args.conv_norm(
                        in_channels,
                        out_channels,
                        _along(axis, kernel_size, 1, args.dims),
                        stride=args.stride,
                        padding=padding,
                        dilation=args.dilation,
                        padding_mode=args.padding_mode,
                    )
                )
        super().__init__(*branches, deployed=args.deployed, mode=args.mode)
