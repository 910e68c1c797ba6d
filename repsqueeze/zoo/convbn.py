"""The plain baseline: one k x k conv (no bias) followed by a BatchNorm."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.blocks import SqueezableBlock
from repsqueeze.zoo.embedding import built_like, take_over
from repsqueeze.zoo.layers import BlockArgs


class ConvBN(SqueezableBlock):
    """k x k conv (no bias) followed by BN: the plain, un-re-parameterized baseline.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size along every spatial dim.
        stride: stride of the block (of its deployed convolution).
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.BlockArgs`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        **shared: Any,
    ) -> None:
        args = BlockArgs.of(type(self).__name__, {"stride": stride, **shared})
        with args.building():
            layers = args.main(in_channels, out_channels, kernel_size)
        super().__init__(*layers, deployed=args.deployed, mode=args.mode)

    @classmethod
    def from_conv_bn(cls, conv: nn.Module, bn: _BatchNorm, **kwargs: Any) -> ConvBN:
        """A block computing ``bn(conv(x))`` exactly (eval and training mode): ``conv``'s
        weights (its bias folded into the statistics) and ``bn``'s statistics, eps and
        momentum.

        Args:
            conv: a ``ConvNd`` with a square, odd kernel, dilation 1 and centred padding.
            bn: the ``BatchNormNd`` after it (the BatchNorm part of a norm + act module).
            **kwargs: further constructor arguments (``mode``, ...).

        Raises:
            ValueError: a pair the block cannot take over, with the reason.
        """
        block = built_like(cls, conv, bn, kwargs)
        take_over(block.layers, conv, bn)
        return block
