"""Giving an expanded model back its original conv and norm layers."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import primitives
from repsqueeze.core.blocks import Squeezable
from repsqueeze.core.squeeze import composites
from repsqueeze.surgery.origin import ORIGIN, Origin


@torch.no_grad()
def contract(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Gives an :func:`expand` -ed model back its original layer types, same function in eval.

    Every block :func:`expand` made becomes the conv and the norm it replaced (same classes
    and attributes, e.g. ``Conv2d(bias=False)`` + ``BatchNorm2d``), holding the block's
    squeezed kernel: the conv gets ``W * s / g`` and the norm keeps the running variance,
    eps, scale ``g`` and shift ``b`` of the block's main BatchNorm (``s = sqrt(var + eps)``),
    with the running mean set so that ``norm(conv(x))`` equals the block in eval mode (a
    channel with ``g == 0`` gets ``g = 1``). The result loads with ``strict=True`` into the
    original architecture and needs no repsqueeze. Blocks ``expand`` did not make are left
    as they are.

    Args:
        model: a model returned by :func:`expand` (then trained).
        inplace: mutate ``model`` instead of a deep copy.

    Returns:
        The contracted model.

    Raises:
        ValueError: when the module ``expand`` left in place of a norm is gone.
    """
    blocks, rests = {}, {}
    for path, m in model.named_modules():
        origin = getattr(m, ORIGIN, None)
        if isinstance(origin, Origin):
            (blocks if isinstance(m, Squeezable) else rests)[id(origin)] = (path, m)
    for key, (path, block) in blocks.items():
        if key not in rests:
            raise ValueError(
                f"contract: {path} ({type(block).__name__}) was made by expand(), but the module "
                "expand() left in place of its BatchNorm is no longer in the model"
            )
    values = composites(list(blocks.values()))  # float64, all checked at once
    replaced: list[tuple[str, nn.Module, nn.Module]] = []  # (path, old, new)
    for (key, (path, block)), (weight, bias) in zip(blocks.items(), values, strict=True):
        rest_path, rest = rests[key]
        origin = getattr(block, ORIGIN)
        conv, norm = _contracted(block, origin, rest, weight, bias, copy_rest=not inplace)
        replaced += [(path, block, conv), (rest_path, rest, norm)]
    if inplace:
        for path, _, new in replaced:
            model.set_submodule(path, new)
        return model
    # a copy in which the replaced modules are never copied: the new ones take their place
    return copy.deepcopy(model, {id(old): new for _, old, new in replaced})


def _contracted(
    block: Squeezable,
    origin: Origin,
    rest: nn.Module,
    weight: Tensor,
    bias: Tensor,
    copy_rest: bool,
) -> tuple[nn.Module, nn.Module]:
    floats = (t.dtype for t in block.parameters() if t.is_floating_point())
    device, dtype = primitives.device_of(block), next(floats, torch.get_default_dtype())
    ref = next((m for m in block.modules() if isinstance(m, _BatchNorm)), None)  # main path's
    if ref is None:  # deployed already: unit statistics
        ref = nn.BatchNorm1d(origin.norm.num_features, eps=origin.norm.eps).eval()
    conv = copy.deepcopy(origin.conv).to_empty(device=device).to(dtype)
    norm = copy.deepcopy(origin.norm).to_empty(device=device).to(dtype)
    split_into(weight, bias, ref, conv, norm)
    for name, child in rest.named_children():  # timm's drop / act: the trained modules
        setattr(norm, name, copy.deepcopy(child) if copy_rest else child)
    return conv.train(block.training), norm.train(block.training)


@torch.no_grad()
def split_into(
    weight: Tensor, bias: Tensor, like: _BatchNorm, conv: nn.Module, norm: _BatchNorm
) -> None:
    """Fills ``conv`` (its bias zeroed) and ``norm`` so that ``norm(conv(x))`` equals the
    convolution ``(weight, bias)`` in eval mode, with ``like``'s running variance, eps,
    scale and shift (see :func:`contract`). Computed in float64, cast once."""
    shape = (-1,) + (1,) * (weight.dim() - 1)
    var = like.running_var.double()
    eps = like.eps
    scale = like.weight.double() if like.affine else torch.ones_like(var)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    shift = like.bias.double() if like.affine else torch.zeros_like(var)
    if not norm.affine:
        scale, shift = torch.ones_like(var), torch.zeros_like(var)
    std = (var + eps).sqrt()
    conv.weight.copy_(weight.double() * (std / scale).reshape(shape))
    if conv.bias is not None:
        conv.bias.zero_()
    norm.eps = eps
    norm.running_var.copy_(var)
    norm.running_mean.copy_((shift - bias.double()) * std / scale)
    norm.num_batches_tracked.copy_(like.num_batches_tracked)
    if norm.affine:
        norm.weight.copy_(scale)
        norm.bias.copy_(shift)
