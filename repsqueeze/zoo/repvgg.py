"""RepVGG's block: k x k conv-BN + 1x1 conv-BN + identity BN, summed.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.
"""

from __future__ import annotations

from torch import nn

from repsqueeze.zoo.layers import BlockArgs
from repsqueeze.zoo.mobileone import MobileOneBlock


class RepVGGBlock(MobileOneBlock):
    """k x k conv-BN + 1x1 conv-BN + identity BN (when shapes allow), summed.

    A :class:`~repsqueeze.zoo.MobileOneBlock` with one k x k branch; the dilation and
    padding mode apply to the main branch.

    Args:
        kernel_size: size of the main branch.
        use_identity: add the BN-only branch; ``None`` adds it when in/out channels match
            and stride is 1.
        use_1x1: add the 1x1 branch.
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.ZooBlock`).
    """

    def parts(
        self,
        args: BlockArgs,
        *,
        use_identity: bool | None = None,
        use_1x1: bool = True,
    ) -> list[nn.Module]:
        return super().parts(
            args,
            use_scale=use_1x1,
            use_identity=use_identity,
        )
