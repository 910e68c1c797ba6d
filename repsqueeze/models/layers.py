"""The pieces every model here is built from: block-activation units, stages, the classifier,
and the backbone interface (timm's ``forward_features`` / ``forward_head`` /
``reset_classifier`` / ``features_only``).

A model is ``stem -> stages -> global average pool -> linear``; each conv-BN of the original
architecture is a block from the model's block factory (:func:`repsqueeze.zoo.block_factory`:
a kind's name resolved once, with its arguments bound), and activations (and
squeeze-and-excitation, where the architecture has it) stay between blocks, so
``rs.deploy(model)`` leaves one convolution per block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from repsqueeze.zoo import BlockFactory

ActLayer = Callable[[], nn.Module]
AttnLayer = Callable[[int], nn.Module]
Unit = Callable[[int, int, int], nn.Module]


def relu() -> nn.Module:
    """The default activation: an in-place ReLU (no copy of each block's output)."""
    return nn.ReLU(inplace=True)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(expand(relu(reduce(mean_hw(x)))))``.

    The attention of RepVGG-D2se and MobileOne-S4, after the block's sum and before its
    activation. It is not linear, so it stays in the deployed model.

    Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018.

    Args:
        channels: channels of the input (and output).
        rd_ratio: hidden channels are ``int(channels * rd_ratio)``.
    """

    def __init__(self, channels: int, rd_ratio: float = 0.0625) -> None:
        super().__init__()
        hidden = int(channels * rd_ratio)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        s = self.expand(torch.relu(self.reduce(s)))  # (N, C, 1, 1)
        return x * torch.sigmoid(s)  # (N, C, H, W)


def block_act(
    block: BlockFactory,
    in_channels: int,
    out_channels: int,
    stride: int = 1,
    act_layer: ActLayer = relu,
    attn_layer: AttnLayer | None = None,
    **block_kwargs: Any,
) -> nn.Sequential:
    """A block from ``block``, then ``attn_layer`` (if any), then an activation.

    Args:
        block: the factory of the blocks (:func:`repsqueeze.zoo.block_factory`).
        in_channels: input channels.
        out_channels: output channels.
        stride: stride of the block.
        act_layer: activation constructor.
        attn_layer: ``attn_layer(out_channels)`` builds an attention module between the block
            and the activation (e.g. :class:`SqueezeExcite`); ``None`` for none.
        **block_kwargs: arguments of this block (``kernel_size``, ``groups``, ...).
    """
    conv = block(in_channels, out_channels, stride=stride, **block_kwargs)
    attn = [attn_layer(out_channels)] if attn_layer is not None else []
    return nn.Sequential(conv, *attn, act_layer())


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


class FeatureInfo(list):
    """One dict per feature level, ``{"num_chs", "reduction", "module", "index"}``, with timm's
    accessors: ``channels()``, ``reduction()``, ``module_name()``."""

    def channels(self) -> list[int]:
        """Channels of each level."""
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        """Total stride of each level relative to the input."""
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        """Path of the module whose output each level is."""
        return [f["module"] for f in self]


class ConvClassifier(nn.Module):
    """``stem -> stages -> global average pool -> linear``, with timm's backbone interface.

    ``forward_features`` returns the last stage's map, ``forward_head`` pools and classifies
    it, ``reset_classifier`` replaces the head, and :attr:`feature_info` describes the
    stem's and every stage's output (the levels ``features_only=True`` returns).

    Args:
        stem: the first layers.
        stages: the stages, applied in order.
        num_features: channels the last stage produces.
        num_classes: outputs of the linear head (0: no head, the pooled features are returned).
        channels: channels after the stem and after each stage (for :attr:`feature_info`).
        reductions: total stride after the stem and after each stage.
    """

    def __init__(
        self,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        num_features: int,
        num_classes: int,
        channels: Sequence[int],
        reductions: Sequence[int],
    ) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.Sequential(*stages)
        self.num_features = num_features
        self.num_classes = num_classes
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()
        names = ["stem", *(f"stages.{i}" for i in range(len(stages)))]
        self.feature_info = FeatureInfo(
            {"num_chs": c, "reduction": r, "module": n, "index": i}
            for i, (c, r, n) in enumerate(zip(channels, reductions, names, strict=True))
        )

    def get_classifier(self) -> nn.Module:
        """The head (an ``nn.Linear``, or ``nn.Identity`` after ``reset_classifier(0)``)."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head by a freshly initialised ``Linear(num_features, num_classes)``;
        ``num_classes=0`` removes it (the model then returns the pooled features)."""
        self.num_classes = num_classes
        device = next(self.parameters()).device
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head = head.to(device=device, dtype=_float_dtype(self))

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map, ``(N, num_features, h, w)``."""
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool and head; ``pre_logits=True`` stops after the pool."""
        x = x.flatten(2).mean(-1)  # (N, num_features)
        return x if pre_logits else self.head(x)  # (N, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class FeatureNet(nn.Module):
    """A classifier's stem and stages returning the feature maps of ``out_indices``.

    What ``create_model(..., features_only=True)`` builds, as timm's ``FeatureListNet``:
    level 0 is the stem's output, level ``i`` the output of stage ``i``; stages after the
    last requested level are dropped. The module names are the classifier's, so its
    ``state_dict`` is the classifier's without the head, and ``rs.deploy`` deploys it.

    Args:
        model: a :class:`ConvClassifier`.
        out_indices: feature levels to return (negative counts from the end).
    """

    def __init__(self, model: ConvClassifier, out_indices: Sequence[int]) -> None:
        super().__init__()
        levels = len(model.feature_info)
        indices = []
        for i in out_indices:
            if not -levels <= i < levels:
                raise ValueError(
                    f"features_only: out_indices {tuple(out_indices)} has {i}; "
                    f"{type(model).__name__} has levels 0..{levels - 1} (or -{levels}..-1)"
                )
            indices.append(i % levels)
        if not indices or len(set(indices)) != len(indices):
            raise ValueError(
                f"features_only: out_indices must name distinct levels, got {tuple(out_indices)}"
            )
        self.out_indices = tuple(sorted(indices))
        self.stem = model.stem
        self.stages = nn.Sequential(*list(model.stages)[: max(self.out_indices)])
        self.feature_info = FeatureInfo(model.feature_info[i] for i in self.out_indices)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)  # (N, C_0, H / r_0, W / r_0)
        features = [x] if 0 in self.out_indices else []
        for i, stage in enumerate(self.stages, start=1):
            x = stage(x)  # (N, C_i, H / r_i, W / r_i)
            if i in self.out_indices:
                features.append(x)
        return features


def _float_dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
