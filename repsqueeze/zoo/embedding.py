"""Blocks that start from an existing conv + BatchNorm: ``from_conv_bn`` of every kind.

A block built this way computes ``bn(conv(x))`` exactly, in eval and in training mode. The
branch blocks (ACNet, DBB, MobileOne) put the pair on their main branch and zero the last
BatchNorm of every other branch; the ExpandNets chains embed the kernel exactly in a chain
of convs (Guo et al., "ExpandNets: Linear Over-parameterization to Train Compact
Convolutional Networks", NeurIPS 2020).
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import primitives
from repsqueeze.core.algebra import CONV_CLASSES
from repsqueeze.core.blocks import Squeezable
from repsqueeze.zoo.layers import NORMS, load_norm


def check_conv_bn(conv: nn.Module, bn: nn.Module) -> None:
    """Refuses a conv + BatchNorm pair a block cannot take over exactly.

    Raises:
        ValueError: naming the rule broken (the reason :func:`repsqueeze.expand` reports).
    """
    if not isinstance(conv, tuple(CONV_CLASSES.values())):
        raise ValueError(f"{type(conv).__name__} is not a Conv1d/2d/3d")
    k, dims = conv.kernel_size, len(conv.kernel_size)
    if len(set(k)) != 1 or k[0] % 2 == 0:
        raise ValueError(f"kernel {tuple(k)} is not square and odd")
    if set(conv.dilation) != {1}:
        raise ValueError(f"dilation {conv.dilation} (blocks are built with dilation 1)")
    if len(set(conv.stride)) != 1:
        raise ValueError(f"stride {conv.stride} differs between axes")
    if primitives.conv_padding(conv) != ((k[0] // 2, k[0] // 2),) * dims:
        raise ValueError(f"padding {conv.padding} is not centred (k // 2)")
    if not isinstance(bn, _BatchNorm) or bn.num_features != conv.out_channels:
        raise ValueError(f"{type(bn).__name__} after it is not a BatchNorm of its channels")
    if bn.running_mean is None:
        raise ValueError("the BatchNorm after it has no running statistics")


def built_like(cls: type, conv: nn.Module, bn: _BatchNorm, kwargs: dict[str, Any]) -> Squeezable:
    """A block of ``cls`` with the geometry of ``conv`` and norms with ``bn``'s eps/momentum."""
    dims = conv.weight.dim() - 2
    norm = nn.SyncBatchNorm if isinstance(bn, nn.SyncBatchNorm) else NORMS[dims]
    geometry = {
        "stride": conv.stride[0],
        "groups": conv.groups,
        "padding_mode": conv.padding_mode,
        "dims": dims,
        "norm_layer": partial(norm, eps=bn.eps, momentum=bn.momentum),
    }
    block = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], **geometry, **kwargs)
    block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    return block.train(conv.training)


class FromConvBN:
    """``from_conv_bn``: a block that starts as an exact copy of a conv + BatchNorm pair. A
    family says how it takes the pair over (:meth:`take_over`) and may refuse pairs it
    cannot hold (:meth:`check_pair`)."""

    @classmethod
    @torch.no_grad()
    def from_conv_bn(cls, conv: nn.Module, bn: _BatchNorm, **kwargs: Any) -> Squeezable:
        """A block computing ``bn(conv(x))`` exactly (eval and training mode): ``conv``'s
        weights (its bias folded into the statistics) and ``bn``'s statistics, eps and
        momentum on the main path; any other branch adds zero.

        Args:
            conv: a ``ConvNd`` with a square, odd kernel, dilation 1 and centred padding.
            bn: the ``BatchNormNd`` after it (the BatchNorm part of a norm + act module).
            **kwargs: further constructor arguments (``mode``, ``internal_channels``, ...).

        Raises:
            ValueError: a pair the block cannot take over, with the reason.
        """
        check_conv_bn(conv, bn)
        cls.check_pair(conv, kwargs)
        block = built_like(cls, conv, bn, kwargs)
        block.take_over(conv, bn)
        return block

    @classmethod
    def check_pair(cls, conv: nn.Module, kwargs: dict[str, Any]) -> None:
        """Refuses a conv this family cannot hold exactly with ``kwargs`` (none here)."""

    def take_over(self, conv: nn.Module, bn: _BatchNorm) -> None:
        """Sets the block's weights so that it computes ``bn(conv(x))``."""
        raise NotImplementedError


@torch.no_grad()
def take_over_pair(main: nn.Module, conv: nn.Module, bn: _BatchNorm) -> None:
    """The ``(conv, norm)`` pair ``main`` computes ``bn(conv(x))``."""
    main[0].weight.copy_(conv.weight)
    load_norm(main[1], bn, conv.bias)


class BranchesFromConvBN(FromConvBN):
    """The blocks whose branch 0 is conv -> BN (ACNet, DBB, MobileOne): branch 0 takes over
    ``bn(conv(x))``; every other branch ends in a BatchNorm with zero scale and shift, so it
    adds zero in eval and in training mode alike."""

    @torch.no_grad()
    def take_over(self, conv: nn.Module, bn: _BatchNorm) -> None:
        main, *others = self.branches
        take_over_pair(main, conv, bn)
        for branch in others:
            last = [m for m in branch.modules() if isinstance(m, _BatchNorm)][-1]
            last.weight.zero_()
            last.bias.zero_()


def embed_chain(convs: list[nn.Module], weight: torch.Tensor) -> None:
    """Weights for a chain of bias-free convs that composes exactly to ``weight``.

    1x1 layers pass channels through (identity on the first channels); 3x3 layers before
    the last spatial one build shifted copies of the input, the last spatial one mixes
    them with ``weight``'s taps.
    """
    c_out, c_in, *k = weight.shape
    spatial = [i for i, c in enumerate(convs) if c.kernel_size[0] > 1]
    # the mixing layer: the last spatial one, else the middle of a 1x1 chain, so that the
    # identity layers around it are at least as wide as what they pass through
    mix = spatial[-1] if spatial else (len(convs) - 1) // 2
    shifts = [(0,) * len(k)]  # offsets carried by the channel groups after each layer
    for i, c in enumerate(convs):
        c.weight.zero_()
        if c.bias is not None:
            c.bias.zero_()
        if i == mix:
            _mix(c.weight, weight, shifts)
            shifts = None
        elif c.kernel_size[0] == 1:
            n = c_in * len(shifts) if shifts is not None else c_out
            idx = torch.arange(n)
            c.weight[(idx, idx, *([0] * len(k)))] = 1
        else:
            shifts = _shift(c.weight, c_in, shifts)


def _shift(w: torch.Tensor, c_in: int, shifts: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """A 3x3 layer turning channel groups at ``shifts`` into groups at every offset + tap."""
    extent = max(s[0] for s in shifts) + 2
    new = list(itertools.product(range(extent + 1), repeat=len(shifts[0])))
    for j, q in enumerate(new):
        u = tuple(min(v, 2) for v in q)
        p = tuple(v - t for v, t in zip(q, u, strict=True))
        src = shifts.index(p)
        for c in range(c_in):
            w[(j * c_in + c, src * c_in + c, *u)] = 1
    return new


def _mix(w: torch.Tensor, weight: torch.Tensor, shifts: list[tuple[int, ...]]) -> None:
    """The layer that sums ``weight``'s taps from channel groups at ``shifts``."""
    c_out, c_in, *k = weight.shape
    kw = w.shape[2]
    if shifts == [(0,) * len(k)] and kw == k[0]:
        w[:c_out, :c_in] = weight
        return
    for q in itertools.product(range(k[0]), repeat=len(k)):
        u = tuple(min(v, kw - 1) for v in q)
        src = shifts.index(tuple(v - t for v, t in zip(q, u, strict=True)))
        taps = (slice(None), slice(None), *q)
        w[(slice(0, c_out), slice(src * c_in, (src + 1) * c_in), *u)] = weight[taps]
