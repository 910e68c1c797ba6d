"""QARepVGG: RepVGG made quantization-friendly.

Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024.
"""

from __future__ import annotations

from torch import nn

from repsqueeze.core.algebra import CONV_CLASSES
from repsqueeze.core.blocks import Parallel, SqueezableBlock
from repsqueeze.zoo.layers import BlockArgs, ZooBlock


class QARepVGGBlock(ZooBlock, SqueezableBlock):
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

    The norm layer is used for the main branch's norm and the one after the sum; the
    dilation and padding mode apply to the main branch.

    Args:
        kernel_size: size of the main branch.
        use_identity: add the identity branch; ``None`` adds it when in/out channels match
            and stride is 1.
        bias_1x1: give the 1x1 conv a bias.
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.ZooBlock`).
    """

    def parts(
        self,
        args: BlockArgs,
        *,
        use_identity: bool | None = None,
        bias_1x1: bool = False,
    ) -> list[nn.Module]:
        if use_identity is None:
            use_identity = args.in_channels == args.out_channels and args.stride == 1
        scale = CONV_CLASSES[args.dims](
            args.in_channels, args.out_channels, 1, args.stride, groups=args.groups, bias=bias_1x1
        )
        branches = [args.main(), scale]
        if use_identity:
            branches.append(nn.Identity())
        return [Parallel(*branches), args.norm(args.out_channels)]
