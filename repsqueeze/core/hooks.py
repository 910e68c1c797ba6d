"""Hooks on the layers inside a block, which the block never calls.

A block runs its layers as functions (on an input it padded once, or composed into one
kernel), never as ``layer(x)``, so hooks registered on them would be silently ignored:
they are refused, with the layer's path and what to do instead.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from repsqueeze.core import tree
from repsqueeze.core.primitives import name_of
from repsqueeze.core.tree import Combinator, join

_OWNER = "hooks"

# torch.nn.utils functions that recompute a layer's weight in a forward pre-hook, and their
# replacements, parametrizations, which recompute it on every read of ``layer.weight``.
_WEIGHT_PRE_HOOKS = {
    WeightNorm: ("weight_norm", "torch.nn.utils.parametrizations.weight_norm"),
    SpectralNorm: ("spectral_norm", "torch.nn.utils.parametrizations.spectral_norm"),
}


def check_inner_hooks(block: Combinator, when: str) -> None:
    """``ValueError`` naming the first layer inside ``block`` that has a hook the block
    would ignore.

    A block runs its layers as functions (on an input it padded once, or composed into one
    kernel), never as ``layer(x)``, so a layer's hooks are never called. Forward pre-hooks
    and forward hooks can change values: refused when ``when`` is ``"build"``, ``"deploy"``
    or ``"forward"``; backward hooks only at ``"forward"``. Parametrizations
    (``torch.nn.utils.parametrize``) are no hooks: the block reads them through
    ``layer.weight``.
    """
    forward = when == "forward"
    memo = block.memo(_OWNER)
    layers = memo.get("layers") if forward else None
    if layers is None:  # kept from the build on: the check runs at every forward
        layers = memo["layers"] = tuple(m for _, m in inner_layers(block, ""))
    for m in layers:
        if (
            m._forward_pre_hooks
            or m._forward_hooks
            or forward
            and (m._backward_pre_hooks or m._backward_hooks)
        ):
            name = next((n for n, other in inner_layers(block, "") if other is m), "?")
            raise ValueError(f"{type(block).__name__}: {_hook_problem(m, name, when)}")


def inner_layers(node: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """Every module below a block or ``nn.Sequential`` that it runs as a function (layers,
    nested blocks and chains, a nested deployed block's conv), with its path."""
    if tree.kind_of(node) == "deployed":
        return [(join(path, "conv"), node.conv)] if path else []
    out = []
    for name, child in tree.parts(node):
        out.append((join(path, name), child))
        if tree.kind_of(child) != "layer":
            out += inner_layers(child, join(path, name))
    return out


def _hook_problem(layer: nn.Module, path: str, when: str) -> str:
    where = name_of(layer, path)
    ignored = "a block never calls its layers' hooks (it runs them as functions)"
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            return (
                f"{where} is pruned with torch.nn.utils.prune, whose forward pre-hook "
                f"recomputes the {hook._tensor_name}, and {ignored}: make the pruning "
                f"permanent first (prune.remove(layer, '{hook._tensor_name}')), or prune the "
                "deployed convolution"
            )
        if type(hook) in _WEIGHT_PRE_HOOKS:
            old, new = _WEIGHT_PRE_HOOKS[type(hook)]
            return (
                f"{where} has torch.nn.utils.{old}, whose forward pre-hook recomputes the "
                f"weight, and {ignored}: use {new} (a parametrization, which the block reads)"
            )
    kinds = [("forward pre-hook", layer._forward_pre_hooks), ("forward hook", layer._forward_hooks)]
    if when == "forward":
        kinds += [
            ("backward pre-hook", layer._backward_pre_hooks),
            ("backward hook", layer._backward_hooks),
        ]
    kind, hook = next((k, next(iter(h.values()))) for k, h in kinds if h)
    what = getattr(hook, "__qualname__", type(hook).__name__)
    return (
        f"{where} has a {kind} ({what}), and {ignored}: register it on the block itself, or "
        "keep the layer outside the block"
    )
