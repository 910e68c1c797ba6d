"""Cross-layer equalization of ``conv -> ReLU -> conv`` pairs (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019).

For two convolutions joined by a ReLU, output channel ``i`` of the first is rescaled by
``1/s_i`` and input channel ``i`` of the second by ``s_i``; ``relu(x / s) = relu(x) / s`` for
``s > 0``, so the function is unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from repsqueeze.core import primitives
from repsqueeze.core.terms import scale_inputs
from repsqueeze.quant.ranges import channel_ranges, input_ranges
from repsqueeze.surgery import fx


def relu_conv_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv1, conv2)`` module paths where ``conv2(relu(conv1(x)))`` is all that happens.

    Found on the ``torch.fx`` graph: ``conv1``'s output goes only into an ``nn.ReLU``
    module, whose output goes only into ``conv2``, and each module is called once. Anything
    else (a residual add, a pool, a conv called twice, an untraceable model) is not a pair,
    so equalizing the pairs is exact by construction.
    """
    try:
        graph = fx.trace(model)
    except Exception as err:  # fx raises many types for untraceable Python
        raise ValueError(
            f"{type(model).__name__} cannot be traced with torch.fx ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); cross-layer equalization needs "
            "the graph to prove that a conv's output reaches the next conv only through a ReLU"
        ) from err
    pairs = []
    for node in graph.module_nodes(primitives.CONVS):
        relu = graph.only_user(node, nn.ReLU) if graph.called_once(node) else None
        conv2 = graph.only_user(relu, primitives.CONVS) if relu is not None else None
        if conv2 is not None:
            pairs.append((node.target, conv2.target))
    return pairs


@torch.no_grad()
def equalize(
    model: nn.Module, iterations: int = 20, inplace: bool = False
) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Cross-layer equalization of every ``conv -> ReLU -> conv`` pair (Nagel et al. 2019).

    For channel ``i`` between the two convolutions, with ``r1_i = max|W1[i]|`` (output
    channel ``i`` of the first) and ``r2_i = max|W2[:, i]|`` (input channel ``i`` of the
    second), ``s_i = sqrt(r1_i / r2_i)`` divides ``W1[i]`` and ``b1[i]`` and multiplies
    ``W2[:, i]``; both ranges become ``sqrt(r1_i * r2_i)``. ReLU is positively homogeneous,
    so the function is unchanged (up to rounding; the scales are computed in float64 and
    each weight is cast back once per pass). Chains of several pairs are swept
    ``iterations`` times, since equalizing one pair changes its neighbours' ranges.

    Args:
        model: a model whose convolutions are plain modules (e.g. ``repsqueeze.deploy(m)``).
        iterations: sweeps over all pairs.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        ``(model, pairs)``: the equalized model and the ``(conv1, conv2)`` paths it changed.
    """
    if not inplace:
        model = copy.deepcopy(model)
    pairs = relu_conv_pairs(model)
    for _ in range(iterations):
        for first, second in pairs:
            conv1, conv2 = model.get_submodule(first), model.get_submodule(second)
            w1, w2 = conv1.weight.double(), conv2.weight.double()
            r1, r2 = channel_ranges(w1), input_ranges(conv2, w2)
            live = (r1 > 0) & (r2 > 0)
            s = torch.where(live, (r1 / r2.where(live, 1.0)).sqrt(), 1.0)
            conv1.weight.copy_(w1 / s.reshape(-1, *([1] * (w1.dim() - 1))))
            if conv1.bias is not None:
                conv1.bias.copy_(conv1.bias.double() / s)
            per_input = s.reshape(-1, 1, *([1] * (w2.dim() - 2)))  # a depthwise 1 x 1 kernel
            conv2.weight.copy_(scale_inputs(w2, per_input, conv2.groups))
    return model, pairs
