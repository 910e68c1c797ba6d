"""repsqueeze: train rich convolution blocks, deploy one exact convolution per block."""

from repsqueeze.algebra import ConvMap
from repsqueeze.blocks import Parallel, Squeezable, SqueezableBlock
from repsqueeze.convert import BorderReport, deploy, make_border_consistent, set_mode
from repsqueeze.zoo import RepVGGBlock

__all__ = [
    "BorderReport",
    "ConvMap",
    "Parallel",
    "RepVGGBlock",
    "Squeezable",
    "SqueezableBlock",
    "deploy",
    "make_border_consistent",
    "set_mode",
]
__version__ = "0.1.0"
