"""What predicts INT8 trouble in a deployed model: per-channel weight ranges.

Folding BatchNorm and branches gives kernels whose output channels can have very different
ranges (RepVGG users' most frequent INT8 complaint); :func:`weight_ranges` reports, for every
convolution, the per-channel ``max|w|`` and its *range ratio* (largest channel over the
median channel).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from repsqueeze.core import primitives


def channel_ranges(weight: Tensor) -> Tensor:
    """``max|w|`` of every output channel of a conv (or linear) weight, in float64."""
    return weight.detach().double().abs().flatten(1).amax(1)


def range_ratio(weight: Tensor) -> float:
    """Largest over median per-output-channel ``max|w|``; 1 means equal ranges, ``inf`` a
    median channel of zeros. Large values mean that one per-tensor scale would leave most
    channels with few quantization levels, and flag layers whose folded kernel has outliers.
    """
    ranges = channel_ranges(weight)
    median, top = float(ranges.quantile(0.5)), float(ranges.max())
    return top / median if median > 0 else (float("inf") if top > 0 else 1.0)


def weight_ranges(model: nn.Module) -> list[dict[str, Any]]:
    """Range statistics of every convolution of ``model`` (deployed blocks included).

    Returns:
        One row per conv, in module order: ``layer`` (its module path), ``out_channels``,
        ``max_abs`` (largest ``|w|``), ``median_channel_max`` and ``range_ratio``.
    """
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, primitives.CONVS) and m.weight.device.type != "meta":
            ranges = channel_ranges(m.weight)
            rows.append(
                {
                    "layer": name,
                    "out_channels": int(m.weight.shape[0]),
                    "max_abs": float(ranges.max()),
                    "median_channel_max": float(ranges.quantile(0.5)),
                    "range_ratio": range_ratio(m.weight),
                }
            )
    return rows


def worst_layers(
    rows: list[dict[str, Any]], n: int = 3, key: str = "range_ratio"
) -> list[dict[str, Any]]:
    """The ``n`` rows of :func:`weight_ranges` with the largest ``key``, worst first."""
    return sorted(rows, key=lambda r: r[key], reverse=True)[:n]


def input_ranges(conv: nn.Module, weight: Tensor) -> Tensor:
    """``max|w|`` over everything that reads each input channel (groups respected)."""
    g = conv.groups
    per_group = weight.abs().reshape(g, weight.shape[0] // g, weight.shape[1], -1)
    return per_group.amax(dim=(1, 3)).reshape(-1)  # (in_channels,)
