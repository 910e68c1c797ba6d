"""Squeeze: the exact convolution of blocks, decided by structure, checked all at once.

The squeezed convolution's architecture (kernel, stride, padding, dilation, groups) is
decided from the structure alone (indicator weights, :func:`layout`) and kept per structure,
so blocks of one kind and shape share one decision. Its values are composed in float64 from
the blocks' tensors and cast once; every tensor read and made is checked for non-finite
values at once, and only when that fails are the blocks rebuilt one by one to name the
layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import compose, geometry, primitives
from repsqueeze.core.algebra import Layout, conv_of
from repsqueeze.core.primitives import Values
from repsqueeze.core.tree import Combinator

_LAYOUTS: dict[tuple, Layout] = {}  # structure_key -> layout, shared by blocks alike
_LAYOUTS_KEPT = 4096


def structure_key(block: Combinator) -> tuple:
    """What decides a block's squeezed architecture: the class, shape attributes and number
    of children of every module in it, in order."""
    key = []
    for m in block.modules():
        if isinstance(m, Combinator):
            extra = (m.deployed, m.combine, m.split)
            if m.deployed:
                extra += (m.deployed_geometry,)
        elif isinstance(m, primitives.CONVS):
            extra = (
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.padding_mode,
            )  # fmt: skip
        elif isinstance(m, _BatchNorm):
            extra = (m.num_features,)
        elif isinstance(m, primitives.POOLS):
            extra = (
                m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                getattr(m, "divisor_override", None),
            )  # fmt: skip
        else:
            extra = ()
        extra = tuple(tuple(v) if isinstance(v, list) else v for v in extra)  # hashable
        key.append((type(m), len(m._modules), *extra))
    return tuple(key)


def layout(block: Combinator, ndim: int, head: int | None = None) -> Layout:
    """The squeezed convolution's shape (kernel, stride, padding, dilation, groups),
    decided from the structure alone and kept per structure: blocks of one kind and shape
    share one decision.

    Args:
        block: the block (not deployed).
        ndim: spatial dimensionality.
        head: compose only the first ``head`` parts (online mode's plan); ``None``: all.
    """
    head = len(block.named_parts()) if head is None else head
    key = (structure_key(block), ndim, head)
    found = _LAYOUTS.get(key)
    if found is None:
        found = compose.layout_of(block, ndim, head)
        if len(_LAYOUTS) >= _LAYOUTS_KEPT:
            _LAYOUTS.clear()
        _LAYOUTS[key] = found
    return found


def build_deployed(block: Combinator) -> nn.Module:
    """The block's deployed convolution with default values (for a state dict to fill)."""
    lay = layout(block, geometry.require_ndim(block))
    return conv_of(lay, geometry.padding_mode(block), torch.get_default_dtype(), "cpu")


def copy_of(conv: nn.Module) -> nn.Module:
    """A new convolution equal to ``conv`` (a deployed block's own)."""
    new = type(conv)(**conv_kwargs(conv))
    new.load_state_dict(conv.state_dict())
    return new


def memory_format_of(block: nn.Module) -> torch.memory_format:
    """``torch.channels_last`` (``_3d``) when a conv weight of the block is stored that way
    (a 1x1 kernel too: by its strides), else ``torch.contiguous_format``."""
    for m in block.modules():
        w = getattr(m, "weight", None) if isinstance(m, primitives.CONVS) else None
        if w is None or w.dim() not in (4, 5):
            continue
        fmt = torch.channels_last if w.dim() == 4 else torch.channels_last_3d
        if w.stride() == _strides(w.shape, fmt) != _strides(w.shape, torch.contiguous_format):
            return fmt
    return torch.contiguous_format


def _strides(shape: torch.Size, fmt: torch.memory_format) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=fmt).stride()


def squeeze_all(named: list[tuple[str, Combinator]]) -> list[nn.Module]:
    """The squeezed convolution of each block (none deployed), the blocks unchanged.

    Each composite is built from the blocks' tensors in float64 with the fewest, largest
    ops (:mod:`repsqueeze.core.compose`'s grouped terms; the architecture from :func:`layout`);
    every input and output tensor is checked for non-finite values at once. Only when that
    check fails are the blocks rebuilt one by one with per-tensor checks, which raise the
    ``ValueError`` naming the layer (prefixed by the block's path, when given).

    Args:
        named: ``(path, block)`` pairs; ``path`` is prefixed to a block's error.
    """
    return _checked(named, _squeezed)


def composites(named: list[tuple[str, Combinator]]) -> list[tuple[Tensor, Tensor]]:
    """The float64 ``(weight, bias)`` of each block's squeezed convolution (in the layout of
    :func:`layout`; a deployed block's own), checked as in :func:`squeeze_all`."""
    return _checked(named, _composite)


def _checked(named: list[tuple[str, Combinator]], build: Callable) -> list:
    """``build(block, check=False)`` of every block, then one check of all the tensors read
    and made; when it fails, ``build(block, check=True)`` block by block names the layer."""
    results, tensors = [], []
    for _, block in named:
        result, made = build(block, check=False)
        results.append(result)
        if made:  # (none on the meta device: no values to check)
            tensors += [t for t in (*block.parameters(), *block.buffers()) if t.is_floating_point()]
            tensors += made
    if primitives.all_finite(tensors):
        return results
    for i, (path, block) in enumerate(named):
        try:
            results[i] = build(block, check=True)[0]
        except ValueError as err:  # the block's message names layers inside it: add where
            raise ValueError(f"{path}: {err}" if path else str(err)) from err
    return results


def _composite(block: Combinator, check: bool) -> tuple[tuple[Tensor, Tensor], list[Tensor]]:
    if block.deployed:
        conv = block.conv
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        pair = conv.weight.detach().double(), bias.detach().to(conv.weight.device).double()
        return pair, list(pair)
    how = Values("exact", torch.float64, primitives.device_of(block), check=check)
    weight, bias = compose.exact_composite(block, layout(block, geometry.require_ndim(block)), how)
    bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return (weight, bias), [weight, bias]


def deploy_blocks(
    model: nn.Module, named: list[tuple[str, Combinator]], inplace: bool
) -> nn.Module:
    """``model`` with the given blocks of it deployed (:func:`squeeze_all`: all checked before
    anything changes).

    Args:
        model: the model holding the blocks.
        named: ``(path, block)`` of blocks of ``model``, none inside another.
        inplace: deploy them in ``model``; else in a deep copy of ``model`` that never copies
            the children of these blocks (the convolutions replace them).
    """
    convs = squeeze_all(named)
    if inplace:
        for (_, block), conv in zip(named, convs, strict=True):
            block.hold(conv, geometry.geometry_of(block, geometry.require_ndim(block)))
        return model
    memo: dict[int, object] = {}
    geos = []
    for _, block in named:
        geos.append(geometry.geometry_of(block, geometry.require_ndim(block)))
        memo.update(block.copy_memo())
    model = copy.deepcopy(model, memo)
    for (_, block), conv, geo in zip(named, convs, geos, strict=True):
        memo[id(block)].hold(conv, geo)
    return model


def _squeezed(block: Combinator, check: bool) -> tuple[nn.Module, list[Tensor]]:
    """``(conv, its tensors)``; ``check``: per-tensor checks, named errors."""
    ndim = geometry.require_ndim(block)
    geometry.in_channels(block)  # the error for a block that fixes no channel count
    lay = layout(block, ndim)
    device, dtype = primitives.device_of(block), primitives.dtype_of(block)
    mode = geometry.padding_mode(block)
    fmt = memory_format_of(block)
    if device.type == "meta":  # no values: the architecture alone, from the structure
        return conv_of(lay, mode, dtype, device, memory_format=fmt), []
    how = Values("exact", torch.float64, device, check=check)
    weight, bias = compose.exact_composite(block, lay, how)
    conv = conv_of(lay, mode, dtype, device, weight, bias, fmt)
    if check:
        _check_cast(block, conv, weight, bias)
    return conv, [conv.weight, conv.bias]  # the cast composite: non-finite if it was


def _check_cast(block: Combinator, conv: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """``ValueError`` when casting the float64 composite to the block's dtype overflowed."""
    for attr, exact in (("weight", weight), ("bias", bias)):
        if exact is None:
            continue
        if not torch.isfinite(getattr(conv, attr)).all():
            dtype = str(conv.weight.dtype).removeprefix("torch.")
            raise ValueError(
                f"{type(block).__name__}: the composite {attr} overflows {dtype} (largest "
                f"|value| {exact.abs().max().item():.4g}, {dtype} holds up to "
                f"{torch.finfo(conv.weight.dtype).max:.4g}); deploy in float32 (.float() "
                "before deploy)"
            )


def conv_kwargs(conv: nn.Module) -> dict:
    """The constructor arguments that rebuild ``conv`` (geometry, bias, device, dtype)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
        "device": conv.weight.device,
        "dtype": conv.weight.dtype,
    }
