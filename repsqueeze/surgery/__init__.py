"""Whole-model conversions: deploy every re-parameterizable block of any ``nn.Module``, set
run modes, expand an existing model into blocks and contract it back, rewrite naive chains."""

from repsqueeze.surgery.border import BorderReport, make_border_consistent
from repsqueeze.surgery.contraction import contract, split_into
from repsqueeze.surgery.deployment import TRAINING_WARNING, deploy
from repsqueeze.surgery.expansion import ExpandReport, block_from_conv_bn, expand
from repsqueeze.surgery.hooks import FOREIGN_HOOKS
from repsqueeze.surgery.mode import set_mode

__all__ = [
    "FOREIGN_HOOKS",
    "TRAINING_WARNING",
    "BorderReport",
    "ExpandReport",
    "block_from_conv_bn",
    "contract",
    "deploy",
    "expand",
    "make_border_consistent",
    "set_mode",
    "split_into",
]
