"""The plain baseline: one k x k conv (no bias) followed by a BatchNorm."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core.blocks import SqueezableBlock
from repsqueeze.zoo.embedding import FromConvBN, take_over_pair
from repsqueeze.zoo.layers import BlockArgs, ZooBlock


class ConvBN(FromConvBN, ZooBlock, SqueezableBlock):
    """k x k conv (no bias) followed by BN: the plain, un-re-parameterized baseline.

    Args:
        kernel_size: kernel size along every spatial dim.
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.ZooBlock`).
    """

    def parts(self, args: BlockArgs) -> list[nn.Module]:
        return [*args.main()]

    @torch.no_grad()
    def take_over(self, conv: nn.Module, bn: _BatchNorm) -> None:
        take_over_pair(self.layers, conv, bn)
