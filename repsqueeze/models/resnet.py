"""ResNets: the CIFAR ResNets (three stages of basic blocks, widths 16/32/64, ``6n + 2``
layers) and the ImageNet ResNet-18 / ResNet-50 that DBB, ACNet and OREPA convert.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. Each 3x3 conv-BN is a
block of any kind; the residual add and the ReLUs stay outside the blocks. As in the DBB
and ACNet ResNets, the 7x7 stem, the 1x1 convs of the bottleneck and a shortcut that
changes shape are plain :class:`~repsqueeze.zoo.ConvBN` (also one convolution deployed);
the stride of a bottleneck is on its 3x3 conv (torchvision's ResNet v1.5).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from repsqueeze.models.layers import ActLayer, ConvClassifier, block_act, make_stages, relu
from repsqueeze.models.registry import register_model
from repsqueeze.zoo import BlockFactory, BlockLike, block_factory


def _shortcut(block: BlockFactory, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """The identity, or a plain 1x1 ConvBN where the residual changes shape."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return block.plain()(in_channels, out_channels, 1, stride)


class BasicBlock(nn.Module):
    """``act(block2(act(block1(x))) + shortcut(x))``.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the first block and of the shortcut.
        block: the factory of the 3x3 blocks (:func:`repsqueeze.zoo.block_factory`); the
            shortcut is a plain ConvBN with its norm, mode and form.
        act_layer: activation constructor.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        block: BlockFactory,
        act_layer: ActLayer = relu,
    ) -> None:
        super().__init__()
        self.conv1 = block_act(block, in_channels, out_channels, stride, act_layer)
        self.conv2 = block(out_channels, out_channels, 3)
        self.shortcut = _shortcut(block, in_channels, out_channels, stride)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))  # (N, C_out, H/s, W/s)


class Bottleneck(nn.Module):
    """``act(conv3(conv2(conv1(x))) + shortcut(x))``: 1x1 ConvBN -> act, 3x3 block (the
    stride) -> act, 1x1 ConvBN to ``4 * planes`` channels.

    Args:
        in_channels: input channels.
        planes: channels of the 3x3 block (the output has ``4 * planes``).
        stride: stride of the 3x3 block and of the shortcut.
        block: the factory of the 3x3 block (:func:`repsqueeze.zoo.block_factory`); the 1x1
            convs and the shortcut are plain ConvBNs with its norm, mode and form.
        act_layer: activation constructor.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        block: BlockFactory,
        act_layer: ActLayer = relu,
    ) -> None:
        super().__init__()
        out_channels = self.expansion * planes
        plain = block.plain()
        self.conv1 = block_act(plain, in_channels, planes, 1, act_layer, kernel_size=1)
        self.conv2 = block_act(block, planes, planes, stride, act_layer)
        self.conv3 = plain(planes, out_channels, 1)
        self.shortcut = _shortcut(block, in_channels, out_channels, stride)
        self.act = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv3(self.conv2(self.conv1(x)))  # (N, 4 planes, H/s, W/s)
        return self.act(y + self.shortcut(x))


class CifarResNet(ConvClassifier):
    """A ResNet for 32x32 inputs with ``depth = 6n + 2`` layers.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        block: the blocks: a kind (see :func:`repsqueeze.zoo.list_blocks`) or a factory
            (:func:`repsqueeze.zoo.block_factory`).
        num_classes: outputs of the linear head.
        in_channels: input channels.
        deployed: build every block's single convolution directly.
        act_layer: activation constructor.
    """

    def __init__(
        self,
        depth: int = 20,
        block: BlockLike = "repvgg",
        num_classes: int = 10,
        in_channels: int = 3,
        deployed: bool = False,
        act_layer: ActLayer = relu,
    ) -> None:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        make = block_factory(block, deployed=deployed)
        stem = block_act(make, in_channels, 16, act_layer=act_layer)
        unit = partial(BasicBlock, block=make, act_layer=act_layer)
        stages = make_stages(unit, 16, (16, 32, 64), (n, n, n), (1, 2, 2))
        super().__init__(stem, stages, 64, num_classes, (16, 16, 32, 64), (1, 1, 2, 4))


class ResNet(ConvClassifier):
    """An ImageNet ResNet: 7x7 stride-2 ConvBN stem, 3x3 max pool, four stages.

    Args:
        unit: :class:`BasicBlock` or :class:`Bottleneck`.
        depths: units per stage.
        block: the blocks of every 3x3 conv: a kind (see :func:`repsqueeze.zoo.list_blocks`)
            or a factory (:func:`repsqueeze.zoo.block_factory`).
        num_classes: outputs of the linear head.
        in_channels, deployed, act_layer: as in :class:`CifarResNet`.
    """

    def __init__(
        self,
        unit: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, ...],
        block: BlockLike = "repvgg",
        num_classes: int = 1000,
        in_channels: int = 3,
        deployed: bool = False,
        act_layer: ActLayer = relu,
    ) -> None:
        make = block_factory(block, deployed=deployed)
        stem_conv = block_act(make.plain(), in_channels, 64, 2, act_layer, kernel_size=7)
        stem = nn.Sequential(stem_conv, nn.MaxPool2d(3, 2, 1))
        e = getattr(unit, "expansion", 1)
        stages, c_in = [], 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            units = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                units.append(unit(c_in, planes, stride, make, act_layer))
                c_in = planes * e
            stages.append(nn.Sequential(*units))
        channels = (64, 64 * e, 128 * e, 256 * e, 512 * e)
        super().__init__(stem, stages, 512 * e, num_classes, channels, (4, 4, 8, 16, 32))


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18: basic blocks, depths 2/2/2/2. Args: :class:`ResNet`."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50: bottleneck blocks, depths 3/4/6/3. Args: :class:`ResNet`."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def resnet20_cifar(**kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (0.27M parameters). Args: :class:`CifarResNet`."""
    return CifarResNet(20, **kwargs)


@register_model
def resnet56_cifar(**kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (0.85M parameters). Args: :class:`CifarResNet`."""
    return CifarResNet(56, **kwargs)
