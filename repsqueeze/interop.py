"""Interop: timm's RepVGG and MobileOne blocks, and the official training-form state dicts of
RepVGG, DBB, ACNet and MobileOne, as repsqueeze blocks with the same function.

* :func:`from_timm` swaps every training-form ``RepVggBlock`` / ``MobileOneBlock`` of a timm
  model (``repvgg_a0``, ``mobileone_s0``, ...) for a repsqueeze block with the same weights
  (or another block kind initialised to the same function), so timm's pretrained training
  weights can be fine-tuned here; timm's attention and activation stay after the block.
* :func:`convert_official_state_dict` / :func:`load_official_state_dict` rename the keys of
  the reference implementations' blocks (branch names and order differ, weights map one to
  one) into ours.

References:
    Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021
    (github.com/DingXiaoH/RepVGG: ``rbr_dense``, ``rbr_1x1``, ``rbr_identity``).
    Ding et al., "Diverse Branch Block", CVPR 2021 (github.com/DingXiaoH/DiverseBranchBlock:
    ``dbb_origin``, ``dbb_1x1``, ``dbb_1x1_kxk``, ``dbb_avg``).
    Ding et al., "ACNet", ICCV 2019 (github.com/DingXiaoH/ACNet: ``square``, ``ver``, ``hor``).
    Vasu et al., "MobileOne", CVPR 2023 (github.com/apple/ml-mobileone: ``rbr_conv``,
    ``rbr_scale``, ``rbr_skip``).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core.auto import MODES
from repsqueeze.core.blocks import Squeezable
from repsqueeze.core.squeeze import conv_kwargs
from repsqueeze.surgery import split_into
from repsqueeze.zoo import MobileOneBlock, RepVGGBlock, block_factory, load_norm


# --- timm ------------------------------------------------------------------------------------
def _timm_blocks() -> tuple[type, type]:
    try:
        from timm.models.byobnet import MobileOneBlock as TimmMobileOne
        from timm.models.byobnet import RepVggBlock as TimmRepVgg
    except ImportError as err:
        raise ImportError("from_timm needs timm: pip install 'repsqueeze[timm]'") from err
    return TimmRepVgg, TimmMobileOne


@torch.no_grad()
def from_timm(
    model: nn.Module,
    block: str | None = None,
    mode: str = "chain",
    inplace: bool = False,
    **block_kwargs,
) -> nn.Module:
    """Replaces timm's training-form RepVGG / MobileOne blocks by repsqueeze blocks.

    Each ``timm.models.byobnet.RepVggBlock`` / ``MobileOneBlock`` becomes
    ``nn.Sequential(block=<ours>, [attn=<timm's attn>], act=<timm's act>)`` computing the
    same function in eval and training mode: by default a :class:`~repsqueeze.RepVGGBlock` /
    :class:`~repsqueeze.MobileOneBlock` holding timm's branch weights one to one; with
    ``block`` another kind (``"dbb"``, ``"acb"``, ``"expand_cl"``, ...), built by its
    ``from_conv_bn`` from timm's block squeezed into one conv + BatchNorm (see
    :func:`repsqueeze.surgery.split_into`), so it starts at the same function. Blocks timm
    has already re-parameterized are left alone.

    Args:
        model: a timm model (``timm.create_model("repvgg_a0")``, ``"mobileone_s0"``, ...) or
            one of its blocks.
        block: ``None`` for the matching kind, or a kind of :func:`repsqueeze.make_block`.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` for the new blocks.
        inplace: mutate ``model`` instead of a deep copy.
        **block_kwargs: further arguments of ``block``'s ``from_conv_bn``.

    Returns:
        The converted model (the replacement when ``model`` is itself a block).

    Raises:
        ValueError: no training-form block found, or one with a part that has no linear
            equivalent (stochastic depth, an anti-aliasing layer, a padding the block
            cannot align), named by its path.
    """
    if mode not in MODES:
        raise ValueError(f"from_timm: mode must be one of {MODES}, got {mode!r}")
    kinds = _timm_blocks()
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, kinds):
        return _from_timm_block(model, "<model>", block, mode, block_kwargs)
    found = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, kinds) and m.reparam_conv is None
    ]
    if not found:
        raise ValueError(
            f"from_timm: {type(model).__name__} has no RepVggBlock or MobileOneBlock in "
            "training form (timm's byobnet RepVGG / MobileOne models have them)"
        )
    for path, m in found:
        model.set_submodule(path, _from_timm_block(m, path, block, mode, block_kwargs))
    return model


def _from_timm_block(
    src: nn.Module, path: str, kind: str | None, mode: str, kwargs: dict
) -> nn.Module:
    if src.reparam_conv is not None:
        return src
    repvgg = isinstance(src, _timm_blocks()[0])
    convs = [src.conv_kxk] if repvgg else list(src.conv_kxk)
    scale = src.conv_1x1 if repvgg else src.conv_scale
    if not isinstance(src.drop_path, nn.Identity):
        raise ValueError(
            f"{path}: drop_path (stochastic depth) has no linear equivalent; create the timm "
            "model with drop_path_rate=0"
        )
    for i, part in enumerate([*convs, scale] if scale is not None else convs):
        _check_conv_norm(part, f"{path} branch {i}")
    main = convs[0].conv
    norm = partial(nn.BatchNorm2d, eps=convs[0].bn.eps, momentum=convs[0].bn.momentum)
    geometry = {
        "in_channels": main.in_channels,
        "out_channels": main.out_channels,
        "kernel_size": main.kernel_size[0],
        "stride": main.stride[0],
        "dilation": main.dilation[0],
        "groups": main.groups,
        "padding_mode": main.padding_mode,
        "use_identity": src.identity is not None,
        "norm_layer": norm,
    }
    if repvgg:
        ours = RepVGGBlock(**geometry, use_1x1=scale is not None)
    else:
        ours = MobileOneBlock(**geometry, num_conv_branches=len(convs), use_scale=scale is not None)
    ours.to(device=main.weight.device, dtype=main.weight.dtype)
    sources = [*convs, *([scale] if scale is not None else []), src.identity]
    for dst, part in zip(ours.branches, sources, strict=False):
        if isinstance(dst, nn.Sequential):
            if dst[0].padding != part.conv.padding:
                raise ValueError(
                    f"{path}: a branch pads {part.conv.padding}, the aligned block needs "
                    f"{dst[0].padding}"
                )
            dst[0].weight.copy_(part.conv.weight)
            load_norm(dst[1], part.bn, part.conv.bias)
        else:
            load_norm(dst, part)
    ours.train(src.training)
    if kind is not None and (kind != ("repvgg" if repvgg else "mobileone") or kwargs):
        ours = convert_block(ours, kind, **kwargs).to(dtype=main.weight.dtype)
    ours.set_mode(mode)
    tail = [("attn", src.attn)] if not isinstance(src.attn, nn.Identity) else []
    return nn.Sequential(OrderedDict([("block", ours), *tail, ("act", src.act)]))


def _check_conv_norm(part: nn.Module, where: str) -> None:
    """A timm ``ConvNormAct`` that is only conv + BatchNorm (no aa, drop or act)."""
    extras = {
        "aa": getattr(part, "aa", None),
        "drop": getattr(part.bn, "drop", None),
        "act": getattr(part.bn, "act", None),
    }
    for name, m in extras.items():
        if m is not None and not isinstance(m, nn.Identity):
            raise ValueError(f"{where}: {name} layer {type(m).__name__} is not linear")
    if type(part.conv) is not nn.Conv2d:
        raise ValueError(
            f"{where}: {type(part.conv).__name__} pads dynamically; only nn.Conv2d is mapped"
        )


@torch.no_grad()
def convert_block(block: nn.Module, kind: str, **kwargs: Any) -> Squeezable:
    """A block of ``kind`` computing what ``block`` computes in eval mode: ``block`` squeezed
    in float64 and split into conv + BatchNorm with the statistics of its first BatchNorm
    (unit statistics for a deployed block), then ``kind``'s ``from_conv_bn``.

    Args:
        block: a squeezable block (training form or deployed).
        kind: a registered kind (see :func:`repsqueeze.zoo.list_blocks`).
        **kwargs: further arguments of the new block.

    Returns:
        The new block, in float64, on ``block``'s device, in its train / eval state.
    """
    device = next(block.parameters()).device
    squeezed = copy.deepcopy(block).double().squeeze()
    like = next((m for m in block.modules() if isinstance(m, _BatchNorm)), None)
    if like is None:  # deployed: unit statistics
        like = nn.BatchNorm2d(squeezed.out_channels).eval()
    conv = conv_like(squeezed).to(device=device, dtype=torch.float64)
    bn = type(like)(like.num_features, eps=like.eps, momentum=like.momentum)
    bn.to(device=device, dtype=torch.float64)
    split_into(squeezed.weight, squeezed.bias, like, conv, bn)
    conv.train(block.training)
    return block_factory(kind).from_conv_bn(conv, bn, **kwargs)


def conv_like(conv: nn.Module) -> nn.Module:
    """A bias-free conv with ``conv``'s geometry, device and dtype (freshly initialised)."""
    return type(conv)(**{**conv_kwargs(conv), "bias": False})


# --- official state dicts --------------------------------------------------------------------
# kind: (key that marks a training-form block, key that marks a deployed one, top-level names
# of the block's modules in the official code). QARepVGG comes first: its blocks also have
# RepVGG's rbr_dense, but a bare rbr_1x1 conv and a trailing bn.
OFFICIAL = {
    "qarepvgg": ("rbr_1x1.weight", "rbr_reparam", ("rbr_dense", "rbr_1x1", "rbr_identity", "bn")),
    "repvgg": ("rbr_dense.conv.weight", "rbr_reparam", ("rbr_dense", "rbr_1x1", "rbr_identity")),
    "dbb": (
        "dbb_origin.conv.weight",
        "dbb_reparam",
        ("dbb_origin", "dbb_1x1", "dbb_1x1_kxk", "dbb_avg"),
    ),
    "acb": (
        "square_conv.weight",
        "fused_conv",
        ("square_conv", "square_bn", "ver_conv", "ver_bn", "hor_conv", "hor_bn"),
    ),
    "mobileone": ("rbr_conv.0.conv.weight", "reparam_conv", ("rbr_conv", "rbr_scale", "rbr_skip")),
}


def _module_map(kind: str, keys: set[str]) -> list[tuple[str, str]]:
    """``(official module path, our module path)`` for one block, from the keys it has."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix + ".") for k in keys)

    def conv_bn(official: str, j: int) -> list[tuple[str, str]]:
        return [(f"{official}.conv", f"branches.{j}.0"), (f"{official}.bn", f"branches.{j}.1")]

    if kind == "qarepvgg":  # (k x k conv-BN + bare 1x1 conv + identity), then one BN
        return [
            ("rbr_dense.conv", "layers.0.branches.0.0"),
            ("rbr_dense.bn", "layers.0.branches.0.1"),
            ("rbr_1x1", "layers.0.branches.1"),
            ("bn", "layers.1"),
        ]
    if kind == "acb":  # our axis-0 branch is k x 1 (ACNet's "ver"), axis 1 is 1 x k ("hor")
        return [
            (f"{name}_{part}", f"branches.{j}.{p}")
            for j, name in enumerate(("square", "ver", "hor"))
            for p, part in enumerate(("conv", "bn"))
        ]
    if kind in ("repvgg", "mobileone"):
        if kind == "repvgg":
            convs, scale, skip = ["rbr_dense"], "rbr_1x1", "rbr_identity"
        else:
            n = sum(1 for k in keys if k.startswith("rbr_conv.") and k.endswith(".conv.weight"))
            convs, scale, skip = [f"rbr_conv.{i}" for i in range(n)], "rbr_scale", "rbr_skip"
        pairs = [p for j, c in enumerate(convs) for p in conv_bn(c, j)]
        j = len(convs)
        if has(scale):
            pairs += conv_bn(scale, j)
            j += 1
        return pairs + [(skip, f"branches.{j}")]
    pairs, j = conv_bn("dbb_origin", 0), 1  # dbb
    if has("dbb_1x1"):
        pairs, j = pairs + conv_bn("dbb_1x1", 1), 2
    first = "idconv1" if has("dbb_1x1_kxk.idconv1") else "conv1"
    for p, part in enumerate((first, "bn1.bn", "conv2", "bn2")):
        pairs.append((f"dbb_1x1_kxk.{part}", f"branches.{j}.{p}"))
    parts = [("conv", 0), ("bn.bn", 1), ("avgbn", 3)] if has("dbb_avg.conv") else [("avgbn", 1)]
    return pairs + [(f"dbb_avg.{o}", f"branches.{j + 1}.{p}") for o, p in parts]


def _identity_1x1(weight: Tensor) -> Tensor:
    """DBB's ``IdentityBasedConv1x1`` stores its kernel minus the identity."""
    eye = torch.zeros_like(weight)
    idx = torch.arange(weight.shape[0])
    eye[(idx, idx % weight.shape[1], *([0] * (weight.dim() - 2)))] = 1
    return weight + eye


def _block_prefixes(state_dict: dict, kind: str) -> list[str]:
    marker, deployed, _ = OFFICIAL[kind]
    prefixes = []
    for key in state_dict:
        for m in (marker, f"{deployed}.weight"):
            if key == m or key.endswith("." + m):
                prefixes.append(key[: len(key) - len(m)])
    return prefixes


def convert_official_state_dict(state_dict: dict[str, Tensor], kind: str | None = None) -> dict:
    """Renames the blocks of an official RepVGG / QARepVGG / DBB / ACNet / MobileOne state
    dict to ours.

    Every block is found by its main branch (``rbr_dense``, ``dbb_origin``, ``square_conv``,
    ``rbr_conv.0``; QARepVGG by its bare ``rbr_1x1`` conv; deployed: ``rbr_reparam``,
    ``dbb_reparam``, ``fused_conv``, ``reparam_conv``, which become our deployed ``conv``);
    its branches are renamed to our ``branches.<i>`` in our order (k x k, then 1x1 /
    asymmetric / scale, then identity; DBB: k x k, 1x1, 1x1 -> k x k, 1x1 -> avg; QARepVGG:
    ``layers.0.branches.<i>`` then the trailing ``layers.1``). DBB's ``IdentityBasedConv1x1``
    gets its identity added back. Keys outside the blocks are kept as they are.

    Args:
        state_dict: the official model's or block's state dict.
        kind: ``"repvgg"``, ``"qarepvgg"``, ``"dbb"``, ``"acb"`` or ``"mobileone"``;
            ``None``: every kind found.

    Returns:
        A new state dict in our key layout.

    Raises:
        ValueError: an unknown kind, no block found, or a key of a block that is not a
            parameter of that kind, named.
    """
    if kind is not None and kind not in OFFICIAL:
        raise ValueError(
            f"unknown official block kind {kind!r}; valid kinds: {', '.join(OFFICIAL)}"
        )
    kinds = [kind] if kind is not None else list(OFFICIAL)
    out = dict(state_dict)
    found = False
    for k in kinds:
        _, deployed, names = OFFICIAL[k]
        for prefix in _block_prefixes(out, k):
            found = True
            own = {
                key[len(prefix) :]: key
                for key in list(out)
                if key.startswith(prefix) and key[len(prefix) :].split(".")[0] in (*names, deployed)
            }
            pairs = [(deployed, "conv"), *_module_map(k, set(own))]
            for suffix, key in own.items():
                value = out.pop(key)
                match = [(o, u) for o, u in pairs if suffix.startswith(o + ".")]
                if not match:
                    raise ValueError(f"{key}: not a parameter of an official {k} block")
                official, ours = max(match, key=lambda p: len(p[0]))
                if official == "dbb_1x1_kxk.idconv1":
                    value = _identity_1x1(value)
                out[prefix + ours + suffix[len(official) :]] = value
    if not found:
        raise ValueError(
            f"no official {kind or ' / '.join(OFFICIAL)} block in the state dict (looked for "
            f"keys ending in {', '.join(OFFICIAL[k][0] for k in kinds)})"
        )
    return out


def load_official_state_dict(
    module: nn.Module, state_dict: dict[str, Tensor], kind: str | None = None
) -> None:
    """Loads an official training-form (or deployed) state dict into our block or model.

    ``module`` must have our blocks where the official model has its blocks (same paths)
    and with the same branches (e.g. ``RepVGGBlock`` with the identity branch exactly where
    RepVGG has ``rbr_identity``); the load is strict.

    Args:
        module: a block or a model made of our blocks.
        state_dict: the official state dict.
        kind: see :func:`convert_official_state_dict`.

    Raises:
        ValueError: what :func:`convert_official_state_dict` raises, and missing or
            unexpected keys after renaming (PyTorch's message, which names them).
    """
    converted = convert_official_state_dict(state_dict, kind)
    try:
        module.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"load_official_state_dict(kind={kind!r}): the renamed state dict does not fit "
            f"{type(module).__name__}: {err}"
        ) from err
