"""repsqueeze: train rich convolution blocks, deploy one exact convolution per block."""

from repsqueeze.algebra import ConvMap
from repsqueeze.blocks import Concat, Parallel, Squeezable, SqueezableBlock
from repsqueeze.convert import (
    BorderReport,
    ExpandReport,
    deploy,
    expand,
    make_border_consistent,
    set_mode,
)
from repsqueeze.export import load_deployed, save_deployed
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
    "Concat",
    "ConvBN",
    "ConvMap",
    "DiverseBranchBlock",
    "ExpandReport",
    "ExpandedConv",
    "MobileOneBlock",
    "Parallel",
    "RepVGGBlock",
    "Squeezable",
    "SqueezableBlock",
    "create_model",
    "deploy",
    "expand",
    "list_models",
    "load_deployed",
    "make_block",
    "make_border_consistent",
    "register_model",
    "save_deployed",
    "set_mode",
]
__version__ = "0.1.0"
