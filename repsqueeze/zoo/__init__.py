"""Re-parameterizable blocks from the literature, each built from the core primitives.

Every block here is linear (a ``Parallel`` or ``SqueezableBlock``, no activation inside) and
squeezes into one convolution; models put the non-linearity between blocks. Through
:func:`make_block`, every kind with the same ``(in, out, k, stride, groups)`` deploys to the
same ``ConvNd(in, out, k, stride, padding=k // 2, groups=groups, bias=True)``.

One module per block family (``convbn``, ``repvgg``, ``acb``, ``dbb``, ``mobileone``,
``expanded``, ``qarepvgg``), the shared layers and arguments in ``layers``, the start from
an existing conv + BatchNorm in ``embedding``, and the kinds by name in ``registry``.

References:
    Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via Asymmetric
    Convolution Blocks", ICCV 2019.
    Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021.
    Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like Unit",
    CVPR 2021.
    Guo et al., "ExpandNets: Linear Over-parameterization to Train Compact Convolutional
    Networks", NeurIPS 2020.
    Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023.
    Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024.
"""

from repsqueeze.zoo.acb import ACBlock
from repsqueeze.zoo.convbn import ConvBN
from repsqueeze.zoo.dbb import DiverseBranchBlock
from repsqueeze.zoo.embedding import FromConvBN
from repsqueeze.zoo.expanded import ExpandedConv
from repsqueeze.zoo.layers import (
    BlockArgs,
    NormLayer,
    ZooBlock,
    centered_padding,
    channel_scale,
    conv,
    conv_norm,
    load_norm,
)
from repsqueeze.zoo.mobileone import MobileOneBlock
from repsqueeze.zoo.qarepvgg import QARepVGGBlock
from repsqueeze.zoo.registry import (
    BLOCKS,
    BlockFactory,
    BlockLike,
    block_factory,
    create_block,
    list_blocks,
    make_block,
    register_block,
    unregister_block,
)
from repsqueeze.zoo.repvgg import RepVGGBlock

__all__ = [
    "BLOCKS",
    "ACBlock",
    "BlockArgs",
    "BlockFactory",
    "BlockLike",
    "ConvBN",
    "DiverseBranchBlock",
    "ExpandedConv",
    "FromConvBN",
    "MobileOneBlock",
    "NormLayer",
    "QARepVGGBlock",
    "RepVGGBlock",
    "ZooBlock",
    "block_factory",
    "centered_padding",
    "channel_scale",
    "conv",
    "conv_norm",
    "create_block",
    "list_blocks",
    "load_norm",
    "make_block",
    "register_block",
    "unregister_block",
]
