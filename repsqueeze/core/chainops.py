"""Chain mode's own operations: BatchNorm before a constant border, the border, pooling.

In chain mode a block pads its input once; the layers in front of the first one that reads
across the border (pointwise convs, BatchNorm) run on the interior only and map the border,
which is one value per channel, alongside it (DBB's BN-and-pad layer). A BatchNorm that
normalises with batch statistics maps the border constant ``f`` to
``bias + (f - mean) * weight / sqrt(var + eps)``, with the statistics of the interior, so
the border value depends on the batch and gradients flow into it.

* :func:`batch_norm_with_border` computes the interior and the border value from the one set
  of statistics the BatchNorm kernel computes anyway (``torch.native_batch_norm``: one
  reduction, not two), updates the running statistics as ``nn.BatchNorm`` does
  (``momentum``, ``momentum=None`` cumulative averaging, ``num_batches_tracked``), and
  differentiates both outputs exactly: the border's gradient adds its terms to
  BatchNorm's own backward.
* :func:`pad_filled` materialises the border for the first layer that reads it: one padded
  copy, the border strips written in place; backward sums the border's gradient per channel.
* :func:`avg_pool` is unpadded average pooling as separable window sums, which on the CPU
  run several times faster forward and backward than the pooling kernels.

Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like Unit",
CVPR 2021 (the BN-and-pad layer, there with running statistics for the border value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

Pad = tuple[tuple[int, int], ...]  # (left, right) per spatial dim
_PLAIN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def fast_path(bn: _BatchNorm) -> bool:
    """Whether :func:`batch_norm_with_border` may stand in for calling ``bn``: a stock
    BatchNorm (no subclass ``forward``) with no module hooks, its own or global, that would
    otherwise see the call."""
    glob = nn.modules.module
    hooks = (
        bn._forward_hooks,
        bn._forward_pre_hooks,
        bn._backward_hooks,
        bn._backward_pre_hooks,
        glob._global_forward_hooks,
        glob._global_forward_pre_hooks,
        glob._global_backward_hooks,
        glob._global_backward_pre_hooks,
    )
    return type(bn).forward in _PLAIN_FORWARDS and not any(hooks)


def momentum_factor(bn: _BatchNorm) -> float:
    """Counts the batch and returns the running-average factor, as ``nn.BatchNorm.forward``
    does before normalising (``momentum=None``: the cumulative average ``1 / batches``)."""
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def batch_norm_with_border(bn: _BatchNorm, x: Tensor, fill: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(bn(x), bn(fill))`` with ``bn``'s batch statistics of ``x``, computed once.

    Args:
        bn: a BatchNorm that normalises with batch statistics (training, or no running
            statistics); its running statistics are updated as by ``bn(x)``.
        x: the interior, ``(N, C, *spatial)``.
        fill: the border value per channel, ``(C,)``; ``None`` for zeros.

    Returns:
        The normalised interior and the normalised border value ``(C,)``.
    """
    running = bn.training and bn.track_running_stats
    factor = momentum_factor(bn) if running else 0.0
    mean, var = (bn.running_mean, bn.running_var) if running else (None, None)
    fill = fill if fill is not None else x.new_zeros(x.shape[1])
    return _BatchNormBorder.apply(x, fill, bn.weight, bn.bias, mean, var, factor, bn.eps)


class _BatchNormBorder(torch.autograd.Function):
    """``native_batch_norm`` on the interior plus the border constant through the same
    affine map; backward adds the border's terms to ``native_batch_norm_backward``."""

    @staticmethod
    def forward(ctx, x, fill, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )
        fhat = (fill.to(mean.dtype) - mean) * invstd  # (C,) the border, normalised
        out = fhat if weight is None else fhat * weight
        out = out if bias is None else out + bias
        ctx.save_for_backward(x, weight, mean, invstd, fhat)
        ctx.eps, ctx.fill_dtype = eps, fill.dtype
        return y, out.to(y.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_fill):
        x, weight, mean, invstd, fhat = ctx.saved_tensors
        # a padded output's gradient arrives as a strided view of the padded one: the CPU
        # kernel is several times slower on it than on a dense copy
        grad_y = grad_y.contiguous(memory_format=_memory_format(x))
        need_x, need_fill, need_w, need_b = ctx.needs_input_grad[:4]
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, mean, invstd, True, ctx.eps,
            [need_x, need_w and weight is not None, need_b and weight is not None],
        )  # fmt: skip
        g = grad_fill.to(mean.dtype)  # (C,)
        scaled = g if weight is None else g * weight  # d border / d fhat
        grad_fill_in = (scaled * invstd).to(ctx.fill_dtype) if need_fill else None
        if need_x:
            # border = shift + fhat * w, fhat = (fill - mean) * invstd: through the mean and
            # the variance each interior sample moves it by k1 * (x - mean) + k0
            count = x.numel() // x.shape[1]
            k0 = -scaled * invstd / count
            k1 = k0 * fhat * invstd
            shape = (1, -1, *(1,) * (x.dim() - 2))
            bias_k = (k0 - k1 * mean).to(x.dtype).reshape(shape)
            grad_x = grad_x.addcmul_(x, k1.to(x.dtype).reshape(shape)).add_(bias_k)
        if grad_w is not None:
            grad_w = grad_w + (g * fhat).to(grad_w.dtype)
        if grad_b is not None:
            grad_b = grad_b + g.to(grad_b.dtype)
        return grad_x, grad_fill_in, grad_w, grad_b, None, None, None, None


def _memory_format(x: Tensor) -> torch.memory_format:
    """The dense layout ``x`` has: channels-last (2-D or 3-D) or contiguous."""
    if not x.is_contiguous():
        for fmt in (torch.channels_last, torch.channels_last_3d):
            if x.dim() == (4 if fmt == torch.channels_last else 5) and x.is_contiguous(
                memory_format=fmt
            ):
                return fmt
    return torch.contiguous_format


def pad_filled(x: Tensor, amount: Pad, fill: Tensor) -> Tensor:
    """Pads the spatial dims of ``x`` by ``(left, right)`` each with a per-channel constant
    ``fill`` (shape ``(C,)``); the interior is copied exactly (no arithmetic on it). Backward
    hands the interior's gradient to ``x`` and the border's sum per channel to ``fill``."""
    return _PadFilled.apply(x, fill, amount)


class _PadFilled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fill, amount):
        out = F.pad(x, [v for pair in reversed(amount) for v in pair])
        value = fill.to(out.dtype).reshape(1, -1, *(1,) * (x.dim() - 2))
        for strip in _border_strips(out.shape, amount):
            out[strip] = value
        ctx.amount, ctx.fill_dtype = amount, fill.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        amount = ctx.amount
        inner = (
            slice(None),
            slice(None),
            *(slice(l, n - r) for (l, r), n in zip(amount, grad.shape[2:], strict=True)),
        )
        grad_fill = None
        if ctx.needs_input_grad[1]:
            dims = [0, *range(2, grad.dim())]
            grad_fill = sum(grad[s].sum(dims) for s in _border_strips(grad.shape, amount))
            grad_fill = grad_fill.to(ctx.fill_dtype)
        return grad[inner], grad_fill, None


def _border_strips(shape: torch.Size, amount: Pad) -> list[tuple[slice, ...]]:
    """Index tuples of disjoint slabs that together cover the border of a padded tensor:
    per spatial dim its two padded sides, within the interior of the dims before it."""
    strips, index = [], [slice(None)] * len(shape)
    for d, (left, right) in enumerate(amount):
        n = shape[d + 2]
        for side in (slice(0, left), slice(n - right, n)):
            if side.stop > side.start:
                strips.append(tuple(index[: d + 2] + [side] + index[d + 3 :]))
        index[d + 2] = slice(left, n - right)
    return strips


def avg_pool(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], divisor: int) -> Tensor:
    """Unpadded average pooling of the spatial dims of ``x``: window sums over ``kernel``
    with ``stride``, divided by ``divisor`` (``prod(kernel)``, or a ``divisor_override``)."""
    return _BoxPool.apply(x, tuple(kernel), tuple(stride), divisor)


class _BoxPool(torch.autograd.Function):
    """Separable window sums, one spatial dim after the other, each a few strided adds;
    backward scatters each output's gradient back over its window the same way."""

    @staticmethod
    def forward(ctx, x, kernel, stride, divisor):
        ctx.shapes, ctx.kernel, ctx.stride, ctx.divisor = [], kernel, stride, divisor
        for d, (k, s) in enumerate(zip(kernel, stride, strict=True)):
            ctx.shapes.append(x.shape)
            taps = _taps(x.shape, d, k, s)
            y = x[taps[0]].clone()
            for tap in taps[1:]:
                y += x[tap]
            x = y
        return x / divisor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad = grad / ctx.divisor
        for d in reversed(range(len(ctx.kernel))):
            shape = ctx.shapes[d]
            spread = grad.new_zeros(shape)
            for tap in _taps(shape, d, ctx.kernel[d], ctx.stride[d]):
                spread[tap] += grad
            grad = spread
        return grad, None, None, None


def _taps(shape: torch.Size, d: int, k: int, s: int) -> list[tuple[slice, ...]]:
    """Per window offset ``j < k``, the index of the inputs that offset reads along spatial
    dim ``d`` (every ``s``-th from ``j``, one per output)."""
    n_out = (shape[d + 2] - k) // s + 1
    head = (slice(None),) * (d + 2)
    return [(*head, slice(j, j + s * (n_out - 1) + 1, s)) for j in range(k)]
