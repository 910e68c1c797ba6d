"""The core: the algebra of convolutions, the layers a block accepts, the block tree and
its interpretations, and the block base classes on top.

Modules, each importing only those above it in this list:

* :mod:`~repsqueeze.core.algebra` (dense affine maps), :mod:`~repsqueeze.core.numerics`
  (TF32 off for exactness checks), :mod:`~repsqueeze.core.chainops` (chain mode's own ops);
* :mod:`~repsqueeze.core.primitives`: the accepted layers, each as geometry, map and run;
* :mod:`~repsqueeze.core.tree`: what a node is, its parts and combine kind, the one walk;
* :mod:`~repsqueeze.core.geometry`, :mod:`~repsqueeze.core.maps`,
  :mod:`~repsqueeze.core.terms` + :mod:`~repsqueeze.core.compose`,
  :mod:`~repsqueeze.core.running`, :mod:`~repsqueeze.core.hooks`: interpretations of a tree;
* :mod:`~repsqueeze.core.squeeze` (exact composites, layouts), :mod:`~repsqueeze.core.online`
  (plans, the online forward), :mod:`~repsqueeze.core.cost` (MACs),
  :mod:`~repsqueeze.core.auto` (mode choice), :mod:`~repsqueeze.core.recompute`;
* :mod:`~repsqueeze.core.blocks`: the block base classes.
"""

from repsqueeze.core.algebra import ConvMap
from repsqueeze.core.blocks import MODES, Concat, Parallel, Squeezable, SqueezableBlock
from repsqueeze.core.tree import COMBINES, Combinator

__all__ = [
    "COMBINES",
    "MODES",
    "Combinator",
    "Concat",
    "ConvMap",
    "Parallel",
    "Squeezable",
    "SqueezableBlock",
]
