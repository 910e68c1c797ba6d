"""RepVGG: a VGG-style plain network of 3x3 blocks with ReLU between them.

Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021. Five stages of
depths ``[1, 2, 4, 14, 1]`` (A) or ``[1, 4, 6, 16, 1]`` (B; D2se: ``[1, 8, 14, 24, 1]``) and
widths ``[min(64, 64a), 64a, 128a, 256a, 512b]``; the first block of each stage has stride 2.
The ``g2`` / ``g4`` variants use 2 / 4 groups in every second block after the stem (the
paper's layers 2, 4, ..., 26); ``D2se`` adds squeeze-and-excitation after every block's sum.
Any block kind can stand in for the RepVGG block; the deployed network is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import nn

from repsqueeze.models.layers import (
    ActLayer,
    ConvClassifier,
    SqueezeExcite,
    block_act,
    relu,
)
from repsqueeze.models.registry import register_model
from repsqueeze.zoo import BlockLike, block_factory

DEPTHS_A = (1, 2, 4, 14, 1)
DEPTHS_B = (1, 4, 6, 16, 1)
DEPTHS_D = (1, 8, 14, 24, 1)


def repvgg_widths(a: float, b: float) -> tuple[int, ...]:
    """Stage widths ``[min(64, 64a), 64a, 128a, 256a, 512b]`` of the paper."""
    return (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))


class RepVGG(ConvClassifier):
    """A RepVGG network.

    Args:
        depths: blocks per stage (the first stage is the stem).
        widths: channels per stage.
        block: the blocks: a kind (see :func:`repsqueeze.zoo.list_blocks`) or a factory
            (:func:`repsqueeze.zoo.block_factory`).
        num_classes: outputs of the linear head.
        in_channels: input channels.
        cifar_stem: stride 1 in the first stage, for 32x32 inputs.
        deployed: build every block's single convolution directly.
        act_layer: activation constructor, applied after every block.
        groups: groups of every second block after the stem (blocks 2, 4, ... counting the
            first block after the stem as 1); the others have 1.
        use_se: squeeze-and-excitation (hidden channels ``C // 16``) after every block.
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        block: BlockLike = "repvgg",
        num_classes: int = 1000,
        in_channels: int = 3,
        cifar_stem: bool = False,
        deployed: bool = False,
        act_layer: ActLayer = relu,
        groups: int = 1,
        use_se: bool = False,
    ) -> None:
        attn = SqueezeExcite if use_se else None
        make = block_factory(block, deployed=deployed)
        unit = partial(block_act, make, act_layer=act_layer, attn_layer=attn)
        first = 1 if cifar_stem else 2
        stem = nn.Sequential(unit(in_channels, widths[0], first))
        stages, c_in, index = [], widths[0], 1
        for width, depth in zip(widths[1:], depths[1:], strict=True):
            units = []
            for i in range(depth):
                g = groups if index % 2 == 0 else 1
                units.append(unit(c_in, width, 2 if i == 0 else 1, groups=g))
                c_in, index = width, index + 1
            stages.append(nn.Sequential(*units))
        reductions = [first * 2**i for i in range(len(widths))]
        super().__init__(stem, stages, widths[-1], num_classes, widths, reductions)


def _variant(depths: Sequence[int], a: float, b: float, **fixed):
    def build(**kwargs) -> RepVGG:
        return RepVGG(depths, repvgg_widths(a, b), **{**fixed, **kwargs})

    return build


def _register(name: str, doc: str, depths: Sequence[int], a: float, b: float, fixed: dict) -> None:
    build = _variant(depths, a, b, **fixed)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{doc}. Args: :class:`RepVGG`."
    build.__annotations__ = {"return": "RepVGG"}
    globals()[name] = register_model(build)


_DEPLOYED = "parameters deployed at 1000 classes"
_G2, _G4 = "2 groups in every second block", "4 groups in every second block"
_VARIANTS = [  # (name, description, depths, a, b, fixed arguments)
    ("repvgg_a0", f"RepVGG-A0 (a=0.75, b=2.5): 8.30M {_DEPLOYED}", DEPTHS_A, 0.75, 2.5, {}),
    ("repvgg_a1", f"RepVGG-A1 (a=1, b=2.5): 12.78M {_DEPLOYED}", DEPTHS_A, 1, 2.5, {}),
    ("repvgg_a2", "RepVGG-A2 (a=1.5, b=2.75)", DEPTHS_A, 1.5, 2.75, {}),
    ("repvgg_b0", f"RepVGG-B0 (a=1, b=2.5): 14.33M {_DEPLOYED}", DEPTHS_B, 1, 2.5, {}),
    ("repvgg_b1", "RepVGG-B1 (a=2, b=4)", DEPTHS_B, 2, 4, {}),
    ("repvgg_b1g2", f"RepVGG-B1g2 (a=2, b=4, {_G2})", DEPTHS_B, 2, 4, {"groups": 2}),
    ("repvgg_b1g4", f"RepVGG-B1g4 (a=2, b=4, {_G4})", DEPTHS_B, 2, 4, {"groups": 4}),
    ("repvgg_b2", "RepVGG-B2 (a=2.5, b=5)", DEPTHS_B, 2.5, 5, {}),
    ("repvgg_b2g2", f"RepVGG-B2g2 (a=2.5, b=5, {_G2})", DEPTHS_B, 2.5, 5, {"groups": 2}),
    ("repvgg_b2g4", f"RepVGG-B2g4 (a=2.5, b=5, {_G4})", DEPTHS_B, 2.5, 5, {"groups": 4}),
    ("repvgg_b3", "RepVGG-B3 (a=3, b=5)", DEPTHS_B, 3, 5, {}),
    ("repvgg_b3g2", f"RepVGG-B3g2 (a=3, b=5, {_G2})", DEPTHS_B, 3, 5, {"groups": 2}),
    ("repvgg_b3g4", f"RepVGG-B3g4 (a=3, b=5, {_G4})", DEPTHS_B, 3, 5, {"groups": 4}),
    (
        "repvgg_d2se",
        "RepVGG-D2se (a=2.5, b=5, depths 8/14/24/1, squeeze-and-excitation)",
        DEPTHS_D,
        2.5,
        5,
        {"use_se": True},
    ),
]
for _spec in _VARIANTS:
    _register(*_spec)
