"""RepVGG: a VGG-style plain network of 3x3 blocks with ReLU between them.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021. Five stages of
depths ``[1, 2, 4, 14, 1]`` (A) or ``[1, 4, 6, 16, 1]`` (B) and widths
``[min(64, 64a), 64a, 128a, 256a, 512b]``; the first block of each stage has stride 2.
Any block kind can stand in for the RepVGG block; the deployed network is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from repsqueeze.models.layers import ActLayer, ConvClassifier, block_act, make_stages, relu
from repsqueeze.models.registry import register_model

DEPTHS_A = (1, 2, 4, 14, 1)
DEPTHS_B = (1, 4, 6, 16, 1)


def repvgg_widths(a: float, b: float) -> tuple[int, ...]:
    """Stage widths ``[min(64, 64a), 64a, 128a, 256a, 512b]`` of the paper."""
    return (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))


class RepVGG(ConvClassifier):
    """A RepVGG network.

    Args:
        depths: blocks per stage (the first stage is the stem).
        widths: channels per stage.
        block: block kind (see :data:`repsqueeze.zoo.BLOCKS`).
        num_classes: outputs of the linear head.
        in_channels: input channels.
        cifar_stem: stride 1 in the first stage, for 32x32 inputs.
        deployed: build every block's single convolution directly.
        act_layer: activation constructor, applied after every block.
        **block_kwargs: forwarded to :func:`~repsqueeze.zoo.make_block`.
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        block: str = "repvgg",
        num_classes: int = 1000,
        in_channels: int = 3,
        cifar_stem: bool = False,
        deployed: bool = False,
        act_layer: ActLayer = relu,
        **block_kwargs,
    ) -> None:
        unit = partial(block_act, block, deployed=deployed, act_layer=act_layer, **block_kwargs)
        strides = [1 if cifar_stem else 2] + [2] * (len(depths) - 1)
        stem, *stages = make_stages(unit, in_channels, widths, depths, strides)
        super().__init__(stem, stages, widths[-1], num_classes)


@register_model
def repvgg_a0(**kwargs) -> RepVGG:
    """RepVGG-A0 (a=0.75, b=2.5): 8.30M parameters deployed at 1000 classes. Args: :class:`RepVGG`."""
    return RepVGG(DEPTHS_A, repvgg_widths(0.75, 2.5), **kwargs)


@register_model
def repvgg_a1(**kwargs) -> RepVGG:
    """RepVGG-A1 (a=1, b=2.5): 12.78M parameters deployed at 1000 classes. Args: :class:`RepVGG`."""
    return RepVGG(DEPTHS_A, repvgg_widths(1, 2.5), **kwargs)


@register_model
def repvgg_b0(**kwargs) -> RepVGG:
    """RepVGG-B0 (a=1, b=2.5): 14.33M parameters deployed at 1000 classes. Args: :class:`RepVGG`."""
    return RepVGG(DEPTHS_B, repvgg_widths(1, 2.5), **kwargs)
