"""The pieces every model here is built from: block-activation units, stages, the classifier.

A model is ``stem -> stages -> global average pool -> linear``; each 3x3 conv-BN of the
original architecture is a block from :func:`repsqueeze.zoo.make_block`, and activations
stay between blocks, so ``rs.deploy(model)`` leaves one convolution per block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from repsqueeze.zoo import make_block

ActLayer = Callable[[], nn.Module]
Unit = Callable[[int, int, int], nn.Module]


def relu() -> nn.Module:
    """The default activation: an in-place ReLU (no copy of each block's output)."""
    return nn.ReLU(inplace=True)


def block_act(
    block: str,
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    deployed: bool = False,
    act_layer: ActLayer = relu,
    **block_kwargs,
) -> nn.Sequential:
    """A 3x3 block of kind ``block`` followed by an activation.

    Args:
        block: block kind (see :data:`repsqueeze.zoo.BLOCKS`).
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the block.
        deployed: build the block's single convolution directly.
        act_layer: activation constructor.
        **block_kwargs: forwarded to :func:`~repsqueeze.zoo.make_block`.
    """
    conv = make_block(
        block, in_channels, out_channels, 3, stride, deployed=deployed, **block_kwargs
    )
    return nn.Sequential(conv, act_layer())


def make_stages(
    unit: Unit,
    in_channels: int,
    widths: Sequence[int],
    depths: Sequence[int],
    strides: Sequence[int],
) -> list[nn.Sequential]:
    """Stages of ``unit(in_channels, out_channels, stride)``, the stride on each stage's first.

    Args:
        unit: builds one unit (a block with its activation, a residual block, ...).
        in_channels: input channels of the first stage.
        widths: output channels of each stage.
        depths: number of units of each stage.
        strides: stride of each stage.
    """
    stages = []
    for width, depth, stride in zip(widths, depths, strides, strict=True):
        units = [
            unit(in_channels if i == 0 else width, width, stride if i == 0 else 1)
            for i in range(depth)
        ]
        stages.append(nn.Sequential(*units))
        in_channels = width
    return stages


class ConvClassifier(nn.Module):
    """``stem -> stages -> global average pool -> linear``.

    Args:
        stem: the first layers.
        stages: the stages, applied in order.
        num_features: channels the last stage produces.
        num_classes: outputs of the linear head.
    """

    def __init__(
        self, stem: nn.Module, stages: Sequence[nn.Module], num_features: int, num_classes: int
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (N, C_stem, H, W)
        x = self.stages(x)  # (N, num_features, h, w)
        return self.head(x.flatten(2).mean(-1))  # (N, num_classes)
