"""ExpandNets: a k x k conv expanded into a linear chain of convs.

Guo et al., "ExpandNets: Linear Over-parameterization to Train Compact Convolutional
Networks", NeurIPS 2020.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core.blocks import SqueezableBlock
from repsqueeze.zoo.embedding import FromConvBN, embed_chain
from repsqueeze.zoo.layers import BlockArgs, ZooBlock, centered_padding, load_norm


class ExpandedConv(FromConvBN, ZooBlock, SqueezableBlock):
    """A k x k conv expanded into a linear chain of convs, then BN (ExpandNets).

    * ``'cl'``: 1x1 (in -> e*in) -> k x k (-> e*out) -> 1x1 (-> out);
    * ``'ck'``: ``(k - 1) // 2`` 3x3 convs with ``e*out`` hidden channels, the stride on the
      last 3x3 (so the window stays k x k); a single 3x3 (k = 3) or none (k = 1) is followed
      by a 1x1 to ``out``, so the chain always has a hidden layer.

    No BN or activation between the convs; every conv has the block's groups and padding
    mode, so the squeezed conv keeps them; dilation is 1.

    Args:
        kernel_size: kernel size of the squeezed conv (odd for ``'ck'``).
        expand_mode: ``'ck'`` (expand the kernel) or ``'cl'`` (expand the channels).
        expansion: channel expansion rate ``e``.
        **shared: the arguments every block takes (:class:`~repsqueeze.zoo.ZooBlock`).
    """

    def parts(
        self,
        args: BlockArgs,
        *,
        expand_mode: str = "ck",
        expansion: int = 4,
    ) -> list[nn.Module]:
        args.require("ExpandedConv", dilation=1)
        if expand_mode == "cl":
            kernels = [1, args.kernel_size, 1]
            channels = [
                args.in_channels,
                expansion * args.in_channels,
                expansion * args.out_channels,
            ]
            paddings = [0, centered_padding(args.kernel_size, 1, args.stride), 0]
            strides = [1, args.stride, 1]
        elif expand_mode == "ck":
            if args.kernel_size % 2 == 0:
                raise ValueError(
                    f"expand_mode='ck' builds a k x k kernel from 3x3 convs and needs an odd "
                    f"kernel_size, got {args.kernel_size}"
                )
            n = args.kernel_size // 2
            kernels = [3] * n + [1] * max(0, 2 - n)
            channels = [args.in_channels] + [expansion * args.out_channels] * (len(kernels) - 1)
            paddings = [k // 2 for k in kernels]
            strides = [args.stride if i == max(n - 1, 0) else 1 for i in range(len(kernels))]
        else:
            raise ValueError(f"expand_mode must be 'ck' or 'cl', got {expand_mode!r}")
        channels.append(args.out_channels)
        steps = zip(channels, channels[1:], kernels, strides, paddings, strict=False)
        layers = [args.conv(c_in, c_out, k, s, p) for c_in, c_out, k, s, p in steps]
        return [*layers, args.norm(args.out_channels)]

    @classmethod
    def check_pair(cls, conv: nn.Module, kwargs: dict[str, Any]) -> None:
        """The convs embed ``conv``'s kernel exactly (1x1 layers pass channels through, the
        3x3 layers of ``'ck'`` build shifted copies of the input, one layer mixes them with
        ``conv``'s taps) for ``groups=1`` and hidden layers wide enough for the copies.

        Raises:
            ValueError: for ``groups > 1``, or when the hidden layers of ``'ck'`` are too
                narrow to hold the shifted copies a kernel above 3 needs.
        """
        if conv.groups != 1:
            raise ValueError("ExpandNets blocks start from an exact embedding only for groups=1")
        k, dims = conv.kernel_size[0], conv.weight.dim() - 2
        hidden = kwargs.get("expansion", 4) * conv.out_channels
        need = conv.in_channels * (k - 2) ** dims
        if kwargs.get("expand_mode", "ck") == "ck" and k >= 5 and hidden < need:
            raise ValueError(
                f"expand_ck needs >= {need} hidden channels for an exact start, has {hidden} "
                f"(expansion * out_channels); raise expansion"
            )

    @torch.no_grad()
    def take_over(self, conv: nn.Module, bn: _BatchNorm) -> None:
        *convs, norm = self.layers
        embed_chain(list(convs), conv.weight)
        load_norm(norm, bn, conv.bias)
