"""The core: the algebra of convolutions, the layers a block accepts, the block tree and
its interpretations (geometry, exact maps, chain-mode running, online terms, cost), and the
block base classes on top."""

from repsqueeze.core.algebra import ConvMap
from repsqueeze.core.blocks import MODES, Concat, Parallel, Squeezable, SqueezableBlock

__all__ = ["MODES", "Concat", "ConvMap", "Parallel", "Squeezable", "SqueezableBlock"]
