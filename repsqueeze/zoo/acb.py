"""ACNet's asymmetric convolution block.

Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric
Convolution Blocks", ICCV 2019.
"""

from __future__ import annotations

from torch import nn

from repsqueeze.core.blocks import Parallel
from repsqueeze.zoo.embedding import BranchesFromConvBN
from repsqueeze.zoo.layers import BlockArgs, ZooBlock, centered_padding


def _along(axis: int, value: int, other: int, dims: int) -> tuple[int, ...]:
    """``value`` on spatial ``axis``, ``other`` on the remaining ones."""
    return tuple(value if d == axis else other for d in range(dims))


class ACBlock(BranchesFromConvBN, ZooBlock, Parallel):
    """k x k conv-BN plus one asymmetric conv-BN per spatial axis, summed (ACNet).

    The asymmetric branch of axis ``d`` has kernel ``k`` along ``d`` and 1 elsewhere (1 x k
    and k x 1 in 2-D), centred on the square kernel. In 1-D it coincides with the square one.
    Every branch has the block's stride, dilation, groups and padding mode.

    Args:
        kernel_size: kernel size of the square branch.
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.ZooBlock`).
    """

    def parts(self, args: BlockArgs) -> list[nn.Module]:
        square = centered_padding(args.kernel_size, args.dilation, args.stride)
        branches = [args.main()]
        for axis in range(args.dims):
            padding = square if isinstance(square, str) else _along(axis, square, 0, args.dims)
            kernel = _along(axis, args.kernel_size, 1, args.dims)
            branch = args.conv_norm(
                args.in_channels,
                args.out_channels,
                kernel,
                args.stride,
                padding,
                args.dilation,
                args.padding_mode,
            )
            branches.append(branch)
        return branches
