"""A small plain network for the 8x8 digits set (scikit-learn's ``load_digits``).

Four 3x3 blocks, 1 -> 32 -> 32 -> 64 -> 64 channels, the third with stride 2 (8x8 -> 4x4),
ReLU between blocks, global average pool and a linear head: about 66k parameters deployed.
"""

from __future__ import annotations

from functools import partial

from repsqueeze.models.layers import ActLayer, ConvClassifier, block_act, make_stages, relu
from repsqueeze.models.registry import register_model
from repsqueeze.zoo import BlockLike, block_factory


@register_model
def digits_net(
    block: BlockLike = "repvgg",
    num_classes: int = 10,
    in_channels: int = 1,
    deployed: bool = False,
    act_layer: ActLayer = relu,
) -> ConvClassifier:
    """The digits network.

    Args:
        block: the blocks: a kind (see :func:`repsqueeze.zoo.list_blocks`) or a factory
            (:func:`repsqueeze.zoo.block_factory`).
        num_classes: outputs of the linear head.
        in_channels: input channels.
        deployed: build every block's single convolution directly.
        act_layer: activation constructor, applied after every block.
    """
    unit = partial(block_act, block_factory(block, deployed=deployed), act_layer=act_layer)
    stem = unit(in_channels, 32, 1)
    stages = make_stages(unit, 32, (32, 64), (1, 2), (1, 2))
    return ConvClassifier(stem, stages, 64, num_classes, (32, 32, 64), (1, 1, 2))
