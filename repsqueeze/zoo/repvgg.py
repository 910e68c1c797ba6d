"""RepVGG's block: k x k conv-BN + 1x1 conv-BN + identity BN, summed.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.
"""

from __future__ import annotations

from typing import Any

from repsqueeze.zoo.mobileone import MobileOneBlock


class RepVGGBlock(MobileOneBlock):
    """k x k conv-BN + 1x1 conv-BN + identity BN (when shapes allow), summed.

    A :class:`~repsqueeze.zoo.MobileOneBlock` with one k x k branch; the dilation and
    padding mode apply to the main branch.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: size of the main branch.
        stride: stride of the block (of its deployed convolution).
        use_identity: add the BN-only branch; ``None`` adds it when in/out channels match
            and stride is 1.
        use_1x1: add the 1x1 branch.
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.BlockArgs`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        use_identity: bool | None = None,
        use_1x1: bool = True,
        **shared: Any,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            num_conv_branches=1,
            use_scale=use_1x1,
            use_identity=use_identity,
            **shared,
        )
