"""The cost floor of online re-parameterization: a minimal hand-written OREPA-style RepVGG.

Hu et al., "Online Convolutional Re-parameterization", CVPR 2022: each branch carries a
learnable per-channel scale instead of a BatchNorm, so the block's kernel is composed from
the parameters in the forward pass and the block runs one convolution and one BatchNorm.
Here the composition is four tensor ops (two scalings, one pad, one sum with the identity
kernel), the least any library can do for a 3x3 + 1x1 + identity block; the network has
repvgg_a0's shapes. The benchmarks time it beside repsqueeze's online forms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FloorRepVGGBlock(nn.Module):
    """3x3 + 1x1 (+ identity when shapes allow) branches with channel scales, one conv, one BN.

    Args:
        c_in: input channels.
        c_out: output channels.
        stride: stride of the block.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.w3 = nn.Parameter(torch.randn(c_out, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5)
        self.w1 = nn.Parameter(torch.randn(c_out, c_in, 1, 1) * (2 / c_in) ** 0.5)
        self.s3 = nn.Parameter(torch.ones(c_out, 1, 1, 1))
        self.s1 = nn.Parameter(torch.ones(c_out, 1, 1, 1))
        if c_in == c_out and stride == 1:
            self.s_id = nn.Parameter(torch.ones(c_out, 1, 1, 1))
            eye = torch.zeros(c_out, c_in, 3, 3)
            eye[torch.arange(c_out), torch.arange(c_in), 1, 1] = 1
            self.register_buffer("eye", eye)
        else:
            self.s_id = None
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.w3 * self.s3 + F.pad(self.w1 * self.s1, (1, 1, 1, 1))
        if self.s_id is not None:
            weight = weight + self.eye * self.s_id
        return self.bn(F.conv2d(x, weight, None, self.stride, 1))  # (N, c_out, H', W')


class FloorRepVGG(nn.Module):
    """repvgg_a0's stages of :class:`FloorRepVGGBlock` + ReLU, global pool, linear head.

    Args:
        num_classes: outputs of the head.
        widths: channels per stage (repvgg_a0: 48, 48, 96, 192, 1280).
        depths: blocks per stage (repvgg A: 1, 2, 4, 14, 1).
        cifar_stem: stride 1 in the first stage.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        widths: tuple[int, ...] = (48, 48, 96, 192, 1280),
        depths: tuple[int, ...] = (1, 2, 4, 14, 1),
        cifar_stem: bool = False,
    ) -> None:
        super().__init__()
        layers, c_in = [], 3
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for i in range(depth):
                stride = 2 if i == 0 and not (stage == 0 and cifar_stem) else 1
                layers += [FloorRepVGGBlock(c_in, width, stride), nn.ReLU(inplace=True)]
                c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))  # (N, num_classes)
