"""Weights of one network carried into another: the file's network built with its own block
kind, then each block carried into the requested kind and form through its function (the
squeezed convolution, split into conv + BatchNorm, then that kind's ``from_conv_bn``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from repsqueeze.core.blocks import Squeezable
from repsqueeze.interop import convert_block
from repsqueeze.models.registry import build_model, signature
from repsqueeze.zoo import (
    ACBlock,
    BlockFactory,
    ConvBN,
    DiverseBranchBlock,
    ExpandedConv,
    MobileOneBlock,
    RepVGGBlock,
    block_factory,
    list_blocks,
)

State = dict[str, Tensor]
HEAD = ("head.weight", "head.bias")
# block classes that take over a conv + BatchNorm exactly, and their kinds
_KINDS = {
    ConvBN: "plain",
    RepVGGBlock: "repvgg",
    ACBlock: "acb",
    DiverseBranchBlock: "dbb",
    MobileOneBlock: "mobileone",
}
# kinds whose stem convolutions all read the input (in_channels adapts branch by branch)
_DIRECT = ("plain", "repvgg", "acb", "mobileone", "qarepvgg", "deployed")


def import_timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            "published weights load through timm, which is not installed: "
            "pip install 'repsqueeze[timm]'"
        ) from err
    return timm


def layout_of(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def mismatch(have: Mapping[str, tuple], want: Mapping[str, tuple], skip=()) -> str | None:
    """One line naming the first missing, unexpected and mis-shaped keys, or ``None``."""
    missing = [k for k in want if k not in have and k not in skip]
    extra = [k for k in have if k not in want and k not in skip]
    shapes = [k for k in want if k in have and k not in skip and have[k] != want[k]]
    parts = []
    if missing:
        parts.append(f"missing {_first(missing)}")
    if extra:
        parts.append(f"unexpected {_first(extra)}")
    for k in shapes[:3]:
        parts.append(f"{k} is {list(have[k])} in the file, {list(want[k])} in the model")
    return "; ".join(parts) or None


def _first(keys: list[str]) -> str:
    """The first three keys, and how many more there are."""
    more = f" (+{len(keys) - 3})" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def blocks_of(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level squeezable blocks by path (none nested in another)."""
    out: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if isinstance(m, Squeezable) and not any(path.startswith(p + ".") for p in out):
            out[path] = m
    return out


def sub_state(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def arch_kwargs(name: str, kwargs: Mapping[str, Any]) -> tuple[dict, dict, str]:
    """Splits create_model's kwargs into the architecture's and the blocks' (a block factory's
    bound arguments included), and names the block kind."""
    sig = signature(name)
    arch = {k: v for k, v in kwargs.items() if k in sig.own}
    block = {k: v for k, v in kwargs.items() if k not in sig.own}
    kind = arch.get("block", sig.block or "repvgg")
    if isinstance(kind, BlockFactory):
        block = {**kind.defaults, **block}
        kind = arch["block"] = kind.kind
    return arch, block, kind


def _meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, **kwargs)


def own_kind(name: str, arch: dict, state: State, hint: dict | None) -> tuple[str, dict]:
    """The block kind (and block kwargs) of a repsqueeze state dict: the checkpoint's
    ``net_config`` when it has one, else the kind whose network has exactly these keys."""
    tried = []
    if hint is not None:
        _, hinted, kind = arch_kwargs(name, hint)
        hinted = {k: v for k, v in hinted.items() if k not in ("name", "pretrained", "deployed")}
        tried.append((kind, {"block": kind, **hinted}))
    have = layout_of(state)
    base = {k: v for k, v in arch.items() if k not in ("block", "deployed", "num_classes")}
    base["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    tried += [(k, {"block": k}) for k in list_blocks()]
    tried += [(f"{k} (online_norm)", {"block": k, "online_norm": True}) for k in list_blocks()]
    for kind, extra in tried:
        try:
            model = _meta_model(name, **base, **extra)
        except (TypeError, ValueError):
            continue
        want = layout_of(model.state_dict())
        if mismatch(have, want, skip=HEAD) is None:
            return kind, {k: v for k, v in extra.items() if k not in ("block", "deployed")}
    raise ValueError(
        f"the file has repsqueeze's key layout but fits {name} with no block kind (deployed "
        "or training form); it was saved from another architecture or with other arguments"
    )


def input_channels(state: Mapping[str, Tensor], first: str | None) -> int | None:
    """Input channels of a network: the fewest of its first block's convolutions read (a
    branch reads the input; a chain's inner layers are at least as wide)."""
    if first is None:
        return None
    ins = [v.shape[1] for k, v in state.items() if k.startswith(first + ".") and v.dim() == 4]
    return min(ins) if ins else None


def adapt_stem(state: State, first: str, kind: str, src_in: int, in_channels: int) -> list[str]:
    """Adapts the first block's convolutions from ``src_in`` to ``in_channels`` input
    channels with timm's ``adapt_input_conv`` (in place); returns the keys adapted."""
    if kind.split(" ")[0] not in _DIRECT:
        raise ValueError(
            f"in_channels={in_channels}: the file's first block ({kind}) has convolutions "
            "that do not read the input; adapt a deployed or RepVGG / MobileOne / ACNet "
            "checkpoint instead"
        )
    import_timm()
    from timm.models import adapt_input_conv

    inside = (k for k in state if k.startswith(first + "."))
    keys = [k for k in inside if state[k].dim() == 4 and state[k].shape[1] == src_in]
    for k in keys:
        state[k] = adapt_input_conv(in_channels, state[k].float()).to(state[k].dtype)
    return keys


@torch.no_grad()
def _carry(src: nn.Module, dst: nn.Module, kind: str | None, kwargs: dict) -> dict[str, Tensor]:
    """The state of ``dst`` that computes what ``src`` computes (eval mode): the deployed
    convolution, or ``kind``'s ``from_conv_bn`` of ``src`` split into conv + BatchNorm."""
    dtype = next(iter(dst.state_dict().values())).dtype
    squeezed = copy.deepcopy(src).double().squeeze()
    if dst.deployed:
        return {"conv.weight": squeezed.weight.to(dtype), "conv.bias": squeezed.bias.to(dtype)}
    if kind is None:
        raise ValueError(
            f"a {type(dst).__name__} cannot start from another block's weights exactly; load "
            "a checkpoint of the same block kind, or build the model with another kind"
        )
    kwargs = _accepted(kind, kwargs)
    if type(dst) is MobileOneBlock:
        k = dst.branches[0][0].kernel_size
        convs = [b for b in dst.branches if isinstance(b, nn.Sequential) and b[0].kernel_size == k]
        kwargs = {"num_conv_branches": len(convs), **kwargs}
    new = convert_block(src, kind, **kwargs)
    return {k: v.to(dtype) for k, v in new.state_dict().items()}


def _accepted(kind: str, kwargs: dict) -> dict:
    """The arguments of ``kwargs`` that blocks of ``kind`` take from a conv + BatchNorm."""
    takes = set(block_factory(kind).parameters()) - {"deployed", "online_norm"}
    return {k: v for k, v in kwargs.items() if k in takes}


def _dst_kind(block: nn.Module, kind: str) -> str | None:
    if isinstance(block, ExpandedConv):
        return kind if kind.startswith("expand_") else None
    return _KINDS.get(type(block))


def official_kwargs(kind: str, state: State, paths: list[str]) -> dict:
    """Block arguments the file's blocks need: MobileOne's number of k x k branches (read
    from the first block after the stem, which has one)."""
    if kind != "mobileone" or len(paths) < 2:
        return {}
    pattern = re.compile(rf"^{re.escape(paths[1])}\.branches\.(\d+)\.0\.weight$")
    branches = {m.group(1) for k, v in state.items() if (m := pattern.match(k)) and v.shape[-1] > 1}
    return {"num_conv_branches": max(len(branches), 1)}


def through_source(
    model: nn.Module, name: str, state: State, source: tuple, target: tuple
) -> tuple[State, list[str]]:
    """The file's network built with its own kind, then carried block by block into
    ``model``'s kinds and form; returns the state for ``model`` and the carried blocks.

    Args:
        model: the model to load.
        name: its registered name.
        state: the file's state dict, in our paths.
        source: ``(kind, layout, block arguments)`` of the file's network.
        target: ``(architecture arguments, block arguments, block kind, input channels)``
            of ``model``.
    """
    kind, layout, src_kwargs = source
    arch, block_kwargs, target_kind, in_channels = target
    classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    args = _source_args(arch, kind, src_kwargs, classes, in_channels)
    network = _meta_model(name, **args)
    problem = mismatch(layout_of(state), layout_of(network.state_dict()))
    if problem:
        raise ValueError(f"the {layout} file ({kind}) does not fit {name}: {problem}")
    network.load_state_dict(state, strict=True, assign=True)
    network.eval()
    wanted = model.state_dict()
    out = dict(state)
    converted = []
    src_blocks = blocks_of(network)
    for path, dst in blocks_of(model).items():
        mine, theirs = sub_state(wanted, path), sub_state(state, path)
        if layout_of(mine) == layout_of(theirs):
            continue
        carried = _carry(src_blocks[path], dst, _dst_kind(dst, target_kind), block_kwargs)
        if layout_of(carried) != layout_of(mine):
            problem = mismatch(layout_of(carried), layout_of(mine))
            raise ValueError(f"{path}: the carried-over block does not fit: {problem}")
        for k in theirs:
            del out[f"{path}.{k}"]
        out.update({f"{path}.{k}": v for k, v in carried.items()})
        converted.append(path)
    return out, converted


def _source_args(arch: dict, kind: str, src_kwargs: dict, classes: int, in_channels) -> dict:
    """Arguments that build the file's network: the architecture's, the file's kind."""
    args = {k: v for k, v in arch.items() if k not in ("block", "deployed", "num_classes")}
    args["num_classes"] = classes
    if in_channels is not None:
        args["in_channels"] = in_channels
    elif "in_channels" in args:
        del args["in_channels"]
    base = kind.split(" ")[0]
    if base == "deployed":
        return {**args, "deployed": True}
    return {**args, "block": base, **src_kwargs}
