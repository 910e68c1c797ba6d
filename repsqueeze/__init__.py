"""repsqueeze: train rich convolution blocks, deploy one exact convolution per block."""

from repsqueeze.core.algebra import ConvMap
from repsqueeze.core.blocks import Concat, Parallel, Squeezable, SqueezableBlock
from repsqueeze.export import load_deployed, save_deployed
from repsqueeze.interop import convert_official_state_dict, from_timm, load_official_state_dict
from repsqueeze.models import create_model, list_models, register_model
from repsqueeze.surgery import (
    BorderReport,
    ExpandReport,
    block_from_conv_bn,
    contract,
    deploy,
    expand,
    make_border_consistent,
    set_mode,
)
from repsqueeze.zoo import (
    BLOCKS,
    ACBlock,
    ConvBN,
    DiverseBranchBlock,
    ExpandedConv,
    MobileOneBlock,
    QARepVGGBlock,
    RepVGGBlock,
    block_factory,
    create_block,
    list_blocks,
    make_block,
    register_block,
)

__all__ = [
    "BLOCKS",
    "ACBlock",
    "BorderReport",
    "Concat",
    "ConvBN",
    "ConvMap",
    "DiverseBranchBlock",
    "ExpandReport",
    "ExpandedConv",
    "MobileOneBlock",
    "Parallel",
    "QARepVGGBlock",
    "RepVGGBlock",
    "Squeezable",
    "SqueezableBlock",
    "block_factory",
    "block_from_conv_bn",
    "contract",
    "convert_official_state_dict",
    "create_block",
    "create_model",
    "deploy",
    "expand",
    "from_timm",
    "list_blocks",
    "list_models",
    "load_deployed",
    "load_official_state_dict",
    "make_block",
    "make_border_consistent",
    "register_block",
    "register_model",
    "save_deployed",
    "set_mode",
]
__version__ = "0.1.0"
