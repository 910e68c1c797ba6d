"""repsqueeze: train rich convolution blocks, deploy one exact convolution per block."""

from repsqueeze.algebra import ConvMap
from repsqueeze.blocks import Parallel, Squeezable, SqueezableBlock
from repsqueeze.convert import BorderReport, deploy, make_border_consistent, set_mode
from repsqueeze.models import create_model, list_models, register_model
from repsqueeze.zoo import (
    BLOCKS,
    ACBlock,
    ConvBN,
    DiverseBranchBlock,
    ExpandedConv,
    MobileOneBlock,
    RepVGGBlock,
    make_block,
)

__all__ = [
    "BLOCKS",
    "ACBlock",
    "BorderReport",
    "ConvBN",
    "ConvMap",
    "DiverseBranchBlock",
    "ExpandedConv",
    "MobileOneBlock",
    "Parallel",
    "RepVGGBlock",
    "Squeezable",
    "SqueezableBlock",
    "create_model",
    "deploy",
    "list_models",
    "make_block",
    "make_border_consistent",
    "register_model",
    "set_mode",
]
__version__ = "0.1.0"
