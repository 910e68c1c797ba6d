"""ResNet for CIFAR: three stages of basic blocks, widths 16/32/64, ``6n + 2`` layers.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (Section 4.2). Each
3x3 conv-BN is a block of any kind; the residual add and the ReLUs stay outside the
blocks, and a shortcut that changes shape is a 1x1 :class:`~repsqueeze.zoo.ConvBN`.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from repsqueeze.models.layers import ActLayer, ConvClassifier, block_act, make_stages, relu
from repsqueeze.models.registry import register_model
from repsqueeze.zoo import ConvBN, make_block


class BasicBlock(nn.Module):
    """``act(block2(act(block1(x))) + shortcut(x))``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first block and of the shortcut.
        block: block kind (see :data:`repsqueeze.zoo.BLOCKS`).
        deployed: build every block's single convolution directly.
        act_layer: activation constructor.
        **block_kwargs: forwarded to :func:`~repsqueeze.zoo.make_block`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        block: str = "repvgg",
        deployed: bool = False,
        act_layer: ActLayer = relu,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.conv1 = block_act(
            block, in_channels, out_channels, stride, deployed, act_layer, **block_kwargs
        )
        self.conv2 = make_block(
            block, out_channels, out_channels, 3, deployed=deployed, **block_kwargs
        )
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            norm_layer = block_kwargs.get("norm_layer")
            self.shortcut = ConvBN(
                in_channels,
                out_channels,
                1,
                stride,
                norm_layer=norm_layer,
                deployed=deployed,
                mode=block_kwargs.get("mode", "chain"),
            )
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))  # (N, C_out, H/s, W/s)


class CifarResNet(ConvClassifier):
    """A ResNet for 32x32 inputs with ``depth = 6n + 2`` layers.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        block: block kind (see :data:`repsqueeze.zoo.BLOCKS`).
        num_classes: outputs of the linear head.
        in_channels: input channels.
        deployed: build every block's single convolution directly.
        act_layer: activation constructor.
        **block_kwargs: forwarded to :func:`~repsqueeze.zoo.make_block`.
    """

    def __init__(
        self,
        depth: int = 20,
        block: str = "repvgg",
        num_classes: int = 10,
        in_channels: int = 3,
        deployed: bool = False,
        act_layer: ActLayer = relu,
        **block_kwargs,
    ) -> None:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        kw = {"block": block, "deployed": deployed, "act_layer": act_layer, **block_kwargs}
        stem = block_act(in_channels=in_channels, out_channels=16, **kw)
        stages = make_stages(partial(BasicBlock, **kw), 16, (16, 32, 64), (n, n, n), (1, 2, 2))
        super().__init__(stem, stages, 64, num_classes)


@register_model
def resnet20_cifar(**kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters). Args: :class:`CifarResNet`."""
    return CifarResNet(20, **kwargs)


@register_model
def resnet56_cifar(**kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (0.85M parameters). Args: :class:`CifarResNet`."""
    return CifarResNet(56, **kwargs)
