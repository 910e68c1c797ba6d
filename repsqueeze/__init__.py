"""repsqueeze: train rich convolution blocks, deploy one exact convolution per block."""

from repsqueeze.algebra import ConvMap
from repsqueeze.blocks import Parallel, Squeezable, SqueezableBlock
from repsqueeze.convert import deploy, set_mode
from repsqueeze.zoo import RepVGGBlock

__all__ = [
    "ConvMap",
    "Parallel",
    "RepVGGBlock",
    "Squeezable",
    "SqueezableBlock",
    "deploy",
    "set_mode",
]
__version__ = "0.1.0"
