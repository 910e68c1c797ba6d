"""The single PyTorch layers a block accepts, each seen three ways.

* :func:`geometry`: stride, padding, window and channels, from attributes alone;
* :func:`linear_map`: the layer as a :class:`~repsqueeze.core.algebra.ConvMap`;
* :func:`run`: the layer applied to an input that was already padded (border-consistent
  padding: the block pads once, every layer runs unpadded).

Accepted: ``nn.Conv1d/2d/3d``, ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm``,
``nn.Identity``, ``nn.AvgPool1d/2d/3d``. Anything else is refused with a ``TypeError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import chainops
from repsqueeze.core.algebra import ConvMap, Pad, dense_kernel

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_NDIM = {
    nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3,
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3,
}  # fmt: skip
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_POOL_FN = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
ACCEPTED = "Conv1d/2d/3d, BatchNorm1d/2d/3d, SyncBatchNorm, Identity, AvgPool1d/2d/3d"


@dataclass(frozen=True)
class Geometry:
    """What a layer does to positions and channels, independent of its weights.

    Attributes:
        stride: per spatial dim.
        pad: ``(left, right)`` border the layer needs on its input, per spatial dim.
        extent: width of the window one output reads (dilation included), per spatial dim.
        padding_mode: padding mode of that border, ``None`` when the layer needs none.
        c_in: input channels, ``None`` for layers that keep whatever they get.
        c_out: output channels, ``None`` likewise.
    """

    stride: tuple[int, ...]
    pad: Pad
    extent: tuple[int, ...]
    padding_mode: str | None
    c_in: int | None
    c_out: int | None

    @property
    def slack(self) -> tuple[int, ...]:
        return tuple(l + r - e for (l, r), e in zip(self.pad, self.extent, strict=True))


def name_of(layer: nn.Module, path: str) -> str:
    return f"{path} ({type(layer).__name__})"


def is_primitive(layer: nn.Module) -> bool:
    return isinstance(layer, (*CONVS, *POOLS, _BatchNorm, nn.Identity))


def ndim_of(layer: nn.Module) -> int | None:
    """Spatial dimensionality a layer fixes, ``None`` for dimension-agnostic ones."""
    for cls, n in _NDIM.items():
        if isinstance(layer, cls):
            return n
    return None


def identity_geometry(ndim: int, channels: int | None = None) -> Geometry:
    return Geometry((1,) * ndim, ((0, 0),) * ndim, (1,) * ndim, None, channels, channels)


def geometry(layer: nn.Module, ndim: int, path: str) -> Geometry:
    """Geometry of one accepted layer; ``TypeError`` for anything that is not linear."""
    if isinstance(layer, CONVS):
        pad = conv_padding(layer)
        extent = tuple(
            d * (k - 1) + 1 for d, k in zip(layer.dilation, layer.kernel_size, strict=True)
        )
        mode = layer.padding_mode if any(map(any, pad)) else None
        return Geometry(layer.stride, pad, extent, mode, layer.in_channels, layer.out_channels)
    if isinstance(layer, POOLS):
        kernel, stride, padding = _pool_args(layer, ndim)
        if layer.ceil_mode:
            raise ValueError(f"{name_of(layer, path)}: ceil_mode=True has no exact convolution")
        if any(padding) and not layer.count_include_pad:
            raise ValueError(
                f"{name_of(layer, path)}: count_include_pad=False with padding divides border "
                "outputs by a position-dependent count, which no convolution reproduces"
            )
        pad = tuple((p, p) for p in padding)
        return Geometry(stride, pad, kernel, "zeros" if any(padding) else None, None, None)
    if isinstance(layer, _BatchNorm):
        return identity_geometry(ndim, layer.num_features)
    if isinstance(layer, nn.Identity):
        return identity_geometry(ndim)
    raise TypeError(
        f"{name_of(layer, path)} is not a linear layer a squeezable block accepts "
        f"({ACCEPTED}, Sequential, SqueezableBlock, Parallel, Concat); put non-linearities between blocks"
    )


def conv_padding(conv: nn.Module) -> Pad:
    if conv.padding == "valid":
        return ((0, 0),) * len(conv.kernel_size)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in conv.padding)


def _pool_args(pool: nn.Module, ndim: int) -> tuple[tuple[int, ...], ...]:
    def tup(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v,) * ndim

    kernel = tup(pool.kernel_size)
    stride = tup(pool.stride) if pool.stride not in (None, (), []) else kernel
    return kernel, stride, tup(pool.padding)


@dataclass(frozen=True)
class Values:
    """Which values a map is built from: ``structure`` (indicator weights, for the
    architecture), ``exact`` (detached copies in ``dtype``, float64 for deploy, checked for
    non-finite values) or ``live`` (the parameters themselves, autograd kept: for online
    training). ``check=False`` skips the per-tensor checks of ``exact`` (the caller checks
    every tensor at once, see :func:`all_finite`, and rebuilds with checks to name the layer
    when that fails)."""

    kind: str
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"
    check: bool = True


# Indicator weights are non-negative path counts: float32 keeps every non-zero non-zero.
STRUCTURE = Values("structure", torch.float32)


def linear_map(layer: nn.Module, c_in: int, ndim: int, path: str, how: Values) -> ConvMap:
    """The layer as a :class:`ConvMap` built as ``how`` says."""
    geo = geometry(layer, ndim, path)
    kw = {"dtype": how.dtype, "device": how.device}
    if isinstance(layer, CONVS):
        if how.kind == "structure":
            weight, bias = torch.ones(layer.weight.shape, **kw), None
        else:
            weight = value_of(layer, path, "weight", how).to(**kw, copy=True)
            bias = value_of(layer, path, "bias", how).to(**kw) if layer.bias is not None else None
        bias = torch.zeros(geo.c_out, **kw) if bias is None else bias
        return ConvMap(
            dense_kernel(weight, layer.groups, layer.dilation), bias, geo.stride, geo.pad
        )
    if isinstance(layer, POOLS):
        kernel = geo.extent
        divisor = getattr(layer, "divisor_override", None) or torch.Size(kernel).numel()
        taps = torch.full(kernel, 1.0 if how.kind == "structure" else 1.0 / divisor, **kw)
        weight = torch.eye(c_in, **kw).reshape(c_in, c_in, *(1,) * ndim) * taps
        return ConvMap(weight, torch.zeros(c_in, **kw), geo.stride, geo.pad)
    if isinstance(layer, _BatchNorm) and how.kind != "structure":
        scale, shift = bn_affine(layer, path, how)
        return _diagonal(scale.to(**kw), shift.to(**kw), ndim)
    channels = geo.c_in if geo.c_in is not None else c_in
    return _diagonal(torch.ones(channels, **kw), torch.zeros(channels, **kw), ndim)


def bn_affine(bn: _BatchNorm, path: str, how: Values) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``bn(x) == scale * x + shift`` in eval mode."""
    if how.kind == "live" and uses_batch_stats(bn):
        raise ValueError(
            f"{name_of(bn, path)} normalises with batch statistics (training mode or no running "
            "statistics), which "
            "mode='online' cannot fold: use mode='chain', or the OREPA-style variant "
            "(online_norm=True: per-branch channel scales and one BatchNorm after the block)"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{name_of(bn, path)} has no running statistics (track_running_stats=False): it "
            "normalises with batch statistics, which cannot be folded into a convolution"
        )
    mean = _cast(value_of(bn, path, "running_mean", how), how.dtype)
    var = _cast(value_of(bn, path, "running_var", how), how.dtype)
    if how.kind == "exact" and how.check and (var + bn.eps <= 0).any():
        raise ValueError(f"{name_of(bn, path)}: running_var + eps must be positive to fold")
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        gamma = _cast(value_of(bn, path, "weight", how), how.dtype)
        beta = _cast(value_of(bn, path, "bias", how), how.dtype)
        scale, shift = scale * gamma, shift * gamma + beta
    return scale, shift


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _diagonal(scale: Tensor, shift: Tensor, ndim: int) -> ConvMap:
    weight = torch.diag(scale).reshape(len(scale), len(scale), *(1,) * ndim)
    return ConvMap(weight, shift, (1,) * ndim, ((0, 0),) * ndim)


def value_of(layer: nn.Module, path: str, attr: str, how: Values) -> Tensor:
    value = getattr(layer, attr)
    if how.kind == "live":
        return value
    value = value.detach()
    if how.check and not torch.isfinite(value).all():
        raise ValueError(
            f"{name_of(layer, path)}: {attr} has non-finite values; refusing to deploy"
        )
    return value


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every value of every tensor is finite, with one host-device synchronisation
    per device, not one per tensor.

    A sum is non-finite when any term is (``inf - inf`` is ``nan``); a sum of finite values
    can overflow, so ``False`` means "maybe": callers then check tensor by tensor to name
    the offending one.
    """
    sums: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        wide = torch.float32 if t.element_size() < 4 else t.dtype  # float16/bfloat16
        sums.setdefault((t.device, wide), []).append(t.sum(dtype=wide))
    flags = {}
    for (device, _), s in sums.items():
        flag = torch.stack(s).isfinite().all()
        flags[device] = flag if device not in flags else flags[device] & flag
    return all(bool(f) for f in flags.values())


def uses_batch_stats(bn: _BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


def dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter or buffer (else the default)."""
    tensors = [*module.parameters(), *module.buffers()]
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return floats[0] if floats else torch.get_default_dtype()


def device_of(layer: nn.Module) -> torch.device:
    tensor = next(iter(layer.parameters()), None)
    if tensor is None:
        tensor = next(iter(layer.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def run(layer: nn.Module, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None = None) -> Tensor:
    """Applies a layer to an already padded input.

    Args:
        layer: an accepted layer.
        x: its input, extended by the layer's own padding plus ``stride * ext``.
        ext: border that the *output* carries for the layers downstream, per spatial dim.
        ndim: spatial dimensionality.
        lazy: zeros of that extension not applied to ``x`` yet; a convolution applies
            symmetric ones as its own padding (no padded copy), other layers pad first.
    """
    if isinstance(layer, CONVS):
        padding = 0
        if lazy is not None and all(l == r for l, r in lazy):
            padding, lazy = tuple(l for l, _ in lazy), None
        x = pad(x, lazy, "zeros")
        return CONV_FN[ndim](
            x, layer.weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups
        )
    x = pad(x, lazy, "zeros")
    if isinstance(layer, POOLS):
        kernel, stride, _ = _pool_args(layer, ndim)
        override = layer.divisor_override if ndim > 1 else None
        if x.device.type == "cpu":  # window sums: several times faster than the CPU kernels
            return chainops.avg_pool(x, kernel, stride, override or math.prod(kernel))
        extra = {"divisor_override": override} if ndim > 1 else {}
        return _POOL_FN[ndim](x, kernel, stride, 0, **extra)
    if isinstance(layer, _BatchNorm):
        return batch_norm(layer, x, ext)
    return x


def batch_norm(bn: _BatchNorm, x: Tensor, ext: Pad) -> Tensor:
    """BatchNorm on a tensor that carries a border of ``ext`` samples for later layers.

    In eval mode the border is normalised like everything else. With batch statistics the
    statistics come from the interior only, so they match those of the same layers with
    per-layer padding and do not depend on how much border the chain carries (the idea of
    DBB's BN-and-pad layer, generalised). ``SyncBatchNorm`` reduces across processes here
    too, with any backend (gloo included).
    """
    batch_stats = uses_batch_stats(bn)
    sync = syncs(bn)
    if batch_stats and not sync:
        check_values_per_channel(bn, x, ext)
    if not batch_stats or not (sync or any(map(any, ext))):
        return bn(x)
    inner = x[
        (slice(None), slice(None), *(slice(l, x.shape[i + 2] - r) for i, (l, r) in enumerate(ext)))
    ]
    dims = [0, *range(2, x.dim())]
    count = inner.numel() // inner.shape[1]
    if sync:
        from torch.distributed.nn.functional import all_reduce

        stats = torch.cat([inner.sum(dims), inner.square().sum(dims), inner.new_tensor([count])])
        stats = all_reduce(stats, group=bn.process_group)
        c = inner.shape[1]
        count = int(stats[-1].item())
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean.square()).clamp_min(0)
    else:
        var, mean = torch.var_mean(inner, dims, correction=0)
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean.detach(), var.detach(), count)
    shape = (1, -1, *(1,) * (x.dim() - 2))
    y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + bn.eps)
    if bn.affine:
        y = y * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    return y


def check_values_per_channel(bn: _BatchNorm, x: Tensor, ext: Pad) -> None:
    """``nn.BatchNorm``'s own refusal of batch statistics over one value per channel (batch 1,
    a single interior position), which would normalise with variance 0; shapes only, no sync."""
    inner = (*x.shape[:2], *(n - l - r for n, (l, r) in zip(x.shape[2:], ext, strict=True)))
    if math.prod(inner) // inner[1] <= 1:
        raise ValueError(
            f"{type(bn).__name__}({bn.num_features}) in a squeezable block: Expected more than "
            f"1 value per channel when training, got input size {torch.Size(inner)} (the "
            "interior it normalises; use a batch of 2 or more, or eval mode)"
        )


def syncs(bn: _BatchNorm) -> bool:
    """Whether a BatchNorm reduces its statistics across processes right now."""
    return (
        isinstance(bn, nn.SyncBatchNorm)
        and bn.training
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )


@torch.no_grad()
def _update_running_stats(bn: _BatchNorm, mean: Tensor, var: Tensor, count: int) -> None:
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * count / max(count - 1, 1)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)


_TORCH_MODE = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


def pad(x: Tensor, amount: Pad | None, mode: str | None) -> Tensor:
    """Pads the spatial dims of ``x`` by ``(left, right)`` each, with a conv padding mode."""
    if amount is None or not any(map(any, amount)):
        return x
    flat = [v for pair in reversed(amount) for v in pair]
    return F.pad(x, flat, mode=_TORCH_MODE[mode or "zeros"])
