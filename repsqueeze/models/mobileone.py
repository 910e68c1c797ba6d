"""MobileOne: a MobileNet-style network of depthwise 3x3 and pointwise 1x1 blocks.

Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", CVPR 2023. A 3x3
stride-2 stem, then four stages of ``[2, 8, 10, 1]`` units; each unit is a depthwise 3x3
block (stride 2 in a stage's first unit) and a pointwise 1x1 block, each followed by ReLU.
Widths ``[min(64, 64 w0), 64 w0, 128 w1, 256 w2, 512 w3]``. S0 trains 4 k x k branches per
block of the stages (``num_conv_branches=4``; the stem has 1, as in the official code), the
others 1; S4 adds squeeze-and-excitation to the last 5
units of stage 3 and to stage 4. Any block kind can stand in for the MobileOne block.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from repsqueeze.models.layers import ActLayer, ConvClassifier, SqueezeExcite, block_act, relu
from repsqueeze.models.registry import register_model
from repsqueeze.zoo import BlockFactory, BlockLike, block_factory

DEPTHS = (2, 8, 10, 1)


def mobileone_widths(w: Sequence[float]) -> tuple[int, ...]:
    """Stem and stage widths ``[min(64, 64 w0), 64 w0, 128 w1, 256 w2, 512 w3]``."""
    stages = (int(c * f) for c, f in zip((64, 128, 256, 512), w, strict=True))
    return (min(64, int(64 * w[0])), *stages)


class MobileOne(ConvClassifier):
    """A MobileOne network.

    Args:
        width_multipliers: the four stage width factors.
        block: the blocks: a kind (see :func:`repsqueeze.zoo.list_blocks`) or a factory
            (:func:`repsqueeze.zoo.block_factory`); the stem of MobileOne blocks has one
            k x k branch.
        num_classes: outputs of the linear head.
        in_channels: input channels.
        deployed: build every block's single convolution directly.
        act_layer: activation constructor, applied after every block.
        se_blocks: per stage, how many of its last units have squeeze-and-excitation.
        depths: units per stage.
    """

    def __init__(
        self,
        width_multipliers: Sequence[float],
        block: BlockLike = "mobileone",
        num_classes: int = 1000,
        in_channels: int = 3,
        deployed: bool = False,
        act_layer: ActLayer = relu,
        se_blocks: Sequence[int] = (0, 0, 0, 0),
        depths: Sequence[int] = DEPTHS,
    ) -> None:
        widths = mobileone_widths(width_multipliers)
        make = block_factory(block, deployed=deployed)
        unit = partial(block_act, make, act_layer=act_layer)
        stem_kwargs = {"num_conv_branches": 1} if make.kind == "mobileone" else {}
        stem = nn.Sequential(unit(in_channels, widths[0], 2, **stem_kwargs))
        stages, c_in = [], widths[0]
        for width, depth, se in zip(widths[1:], depths, se_blocks, strict=True):
            units = []
            for i in range(depth):
                attn = SqueezeExcite if i >= depth - se else None
                stride = 2 if i == 0 else 1
                units.append(unit(c_in, c_in, stride, groups=c_in, attn_layer=attn))
                units.append(unit(c_in, width, 1, kernel_size=1, attn_layer=attn))
                c_in = width
            stages.append(nn.Sequential(*units))
        reductions = [2 ** (i + 1) for i in range(len(widths))]
        super().__init__(stem, stages, widths[-1], num_classes, widths, reductions)


def with_branches(block: BlockLike, branches: int) -> BlockFactory:
    """``block``'s factory; MobileOne blocks get ``branches`` k x k branches unless bound."""
    make = block_factory(block)
    if make.kind == "mobileone" and "num_conv_branches" not in make.defaults:
        make = make.bind(num_conv_branches=branches)
    return make


def _build(
    width_multipliers, branches: int = 1, se_blocks=(0, 0, 0, 0), block="mobileone", **kwargs
) -> MobileOne:
    block = with_branches(block, branches)
    return MobileOne(width_multipliers, block=block, se_blocks=se_blocks, **kwargs)


@register_model
def mobileone_s0(**kwargs) -> MobileOne:
    """MobileOne-S0 (widths x0.75/1/1/2, 4 k x k branches per MobileOne block). Args: :class:`MobileOne`."""
    return _build((0.75, 1.0, 1.0, 2.0), branches=4, **kwargs)


@register_model
def mobileone_s1(**kwargs) -> MobileOne:
    """MobileOne-S1 (widths x1.5/1.5/2/2.5). Args: :class:`MobileOne`."""
    return _build((1.5, 1.5, 2.0, 2.5), **kwargs)


@register_model
def mobileone_s2(**kwargs) -> MobileOne:
    """MobileOne-S2 (widths x1.5/2/2.5/4). Args: :class:`MobileOne`."""
    return _build((1.5, 2.0, 2.5, 4.0), **kwargs)


@register_model
def mobileone_s3(**kwargs) -> MobileOne:
    """MobileOne-S3 (widths x2/2.5/3/4). Args: :class:`MobileOne`."""
    return _build((2.0, 2.5, 3.0, 4.0), **kwargs)


@register_model
def mobileone_s4(**kwargs) -> MobileOne:
    """MobileOne-S4 (widths x3/3.5/3.5/4, squeeze-and-excitation). Args: :class:`MobileOne`."""
    return _build((3.0, 3.5, 3.5, 4.0), se_blocks=(0, 0, 5, 1), **kwargs)
