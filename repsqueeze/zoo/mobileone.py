"""MobileOne's block: ``n`` k x k branches, a 1x1 scale branch and an identity BatchNorm.

Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023.
"""

from __future__ import annotations

from torch import nn

from repsqueeze.core.blocks import Parallel
from repsqueeze.zoo.embedding import BranchesFromConvBN
from repsqueeze.zoo.layers import BlockArgs, ZooBlock


class MobileOneBlock(BranchesFromConvBN, ZooBlock, Parallel):
    """``n`` k x k conv-BN + 1x1 conv-BN (scale) + identity BN (when shapes allow), summed.

    The dilation and padding mode apply to the k x k branches.

    Args:
        kernel_size: size of the k x k branches.
        num_conv_branches: number ``n >= 1`` of parallel k x k conv-BN branches.
        use_scale: add the 1x1 conv-BN branch; ``None`` adds it for ``kernel_size > 1``
            (a 1x1 block's conv branches are already 1x1, as in MobileOne).
        use_identity: add the BN-only branch; ``None`` adds it when in/out channels match
            and stride is 1.
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.ZooBlock`).
    """

    def parts(
        self,
        args: BlockArgs,
        *,
        num_conv_branches: int = 1,
        use_scale: bool | None = None,
        use_identity: bool | None = None,
    ) -> list[nn.Module]:
        if num_conv_branches < 1:
            raise ValueError(f"num_conv_branches must be at least 1, got {num_conv_branches}")
        if use_identity is None:
            use_identity = args.in_channels == args.out_channels and args.stride == 1
        if use_scale is None:
            use_scale = args.kernel_size > 1
        branches = [args.main() for _ in range(num_conv_branches)]
        if use_scale:
            branches.append(args.conv_norm(args.in_channels, args.out_channels, 1, args.stride))
        if use_identity:
            branches.append(args.norm(args.out_channels))
        return branches
