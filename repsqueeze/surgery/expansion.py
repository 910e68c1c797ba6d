"""ExpandNets-style embedding of an existing model into blocks, and the block that computes
a given conv -> BatchNorm."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import primitives
from repsqueeze.core.blocks import Squeezable
from repsqueeze.surgery import fx
from repsqueeze.surgery.hooks import (
    FOREIGN_REASON,
    check_module,
    self_deploying_owner,
    wrappers,
)
from repsqueeze.surgery.origin import ORIGIN, Origin
from repsqueeze.zoo import block_factory


@dataclass
class ExpandReport:
    """What :func:`expand` did: ``expanded`` maps each conv's path to its block kind (the
    BatchNorm after it became ``Identity``, or its activation for a norm + act module);
    ``skipped`` lists ``(path, reason)``."""

    expanded: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@torch.no_grad()
def expand(
    model: nn.Module,
    block: str = "repvgg",
    inplace: bool = False,
    return_report: bool = False,
    **block_kwargs,
) -> nn.Module | tuple[nn.Module, ExpandReport]:
    """Turns an existing model into its over-parameterized training form.

    Each eligible convolution and the BatchNorm that consumes it become one block of kind
    ``block`` (its ``from_conv_bn``), initialised so that the function is unchanged (in
    eval and in training mode): the block's main path carries the old weights and
    statistics, every extra branch ends in a BatchNorm with zero scale and shift (ExpandNets
    chains start as an exact embedding of the old kernel). ``deploy(expand(model))`` has the
    layer shapes of ``model``; :func:`contract` gives back the original layer types.

    Eligible: a ``ConvNd`` with a square, odd kernel, dilation 1 and centred padding whose
    output feeds only a ``BatchNorm`` (found by tracing with ``torch.fx``; inside an
    ``nn.Sequential`` when the model cannot be traced). A norm + activation module (timm's
    ``BatchNormAct2d``) counts as a BatchNorm: its BatchNorm part goes into the block, its
    ``drop`` and ``act`` stay in its place. torchvision's ``Conv2dNormActivation`` is a
    conv -> BatchNorm -> activation ``nn.Sequential``. Everything else stays as it is and
    is listed in the report, with the reason.

    Args:
        model: any module, e.g. a torchvision ResNet with pretrained weights loaded.
        block: a kind of :func:`repsqueeze.zoo.make_block` (``repvgg``, ``acb``, ``dbb``,
            ``mobileone``, ``expand_ck``, ``expand_cl``, ``plain``).
        inplace: mutate ``model`` instead of a deep copy.
        return_report: also return an :class:`ExpandReport`.
        **block_kwargs: further arguments of the blocks (``expansion``, ...).
    """
    _check_expand(model, block, block_kwargs)
    if not inplace:
        model = copy.deepcopy(model)
    report = ExpandReport()
    foreign = []
    for conv_path, bn_path in _conv_bn_pairs(model, report):
        owner = self_deploying_owner(model, conv_path) or self_deploying_owner(model, bn_path)
        if owner is not None:
            foreign.append(owner)
            report.skipped.append((conv_path, f"inside {owner}, {FOREIGN_REASON}"))
            continue
        conv, bn = model.get_submodule(conv_path), model.get_submodule(bn_path)
        try:
            new = block_from_conv_bn(block, conv, bn, **block_kwargs)
        except ValueError as err:
            report.skipped.append((conv_path, str(err)))
            continue
        _put(model, (conv_path, conv), (bn_path, bn), new)
        report.expanded[conv_path] = block
    if foreign:
        warnings.warn(
            f"expand: {len(foreign)} conv(s) inside {len(set(foreign))} module(s) that "
            f"re-parameterize themselves were left as they are (first: {foreign[0]}); "
            "convert timm's RepVGG / MobileOne blocks with rs.from_timm instead",
            UserWarning,
            stacklevel=3,  # the caller of expand (torch.no_grad wraps it)
        )
    return (model, report) if return_report else model


def _check_expand(model: nn.Module, block: str, block_kwargs: dict) -> None:
    """Refuses what :func:`expand` cannot start as an exact copy of ``model``."""
    block_factory(block)  # an unknown kind is refused, naming the valid ones
    if block == "qarepvgg":
        raise ValueError(
            "expand: block='qarepvgg' cannot start as an exact copy of conv -> BatchNorm: its "
            "identity branch has no BatchNorm to zero and its output is normalised twice (in "
            "the k x k branch and after the sum); build it with make_block and train it"
        )
    if block_kwargs.get("online_norm"):
        raise ValueError(
            "expand: online_norm=True blocks have no BatchNorm to take over the old one"
        )
    check_module("expand", model)
    wrapper = next((cls for cls, _ in wrappers() if isinstance(model, cls)), None)
    if wrapper is not None:
        raise ValueError(
            f"expand: the model is wrapped in {wrapper.__name__}; expand the module inside "
            "before wrapping it (the wrapper holds on to the parameters it was built with)"
        )


def _put(
    model: nn.Module,
    conv: tuple[str, nn.Module],
    bn: tuple[str, _BatchNorm],
    block: Squeezable,
) -> None:
    """Puts ``block`` in the conv's place and, in the norm's, what the norm holds besides
    its BatchNorm (timm's ``drop`` / ``act``; else ``Identity``), both marked with an
    :class:`Origin` for :func:`contract`."""
    (conv_path, conv_module), (bn_path, bn_module) = conv, bn
    origin = Origin(copy.deepcopy(conv_module).to("meta"), copy.deepcopy(bn_module).to("meta"))
    rest = (
        nn.Sequential(OrderedDict(bn_module.named_children()))
        if len(bn_module._modules)
        else nn.Identity()
    )
    setattr(block, ORIGIN, origin)
    setattr(rest, ORIGIN, origin)
    model.set_submodule(conv_path, block)
    model.set_submodule(bn_path, rest)


def block_from_conv_bn(kind: str, conv: nn.Module, bn: _BatchNorm, **kwargs) -> Squeezable:
    """A block of ``kind`` computing ``bn(conv(x))``: ``from_conv_bn`` of its class.

    Args:
        kind: a kind of :func:`repsqueeze.zoo.make_block`.
        conv: a ``ConvNd`` (square, odd kernel, dilation 1, centred padding).
        bn: the BatchNorm after it.
        **kwargs: further arguments of the block.
    """
    return block_factory(kind).from_conv_bn(conv, bn, **kwargs)


def _conv_bn_pairs(model: nn.Module, report: ExpandReport) -> list[tuple[str, str]]:
    """``(conv path, bn path)`` where the conv's output goes only into that BatchNorm."""
    try:
        graph = fx.trace(model, leaves=(_BatchNorm,))  # timm's BatchNormAct2d stays one module
    except Exception as err:  # not traceable: fall back to nn.Sequential neighbours
        report.skipped.append(("<model>", f"not traceable with torch.fx ({type(err).__name__}); "
                                          "only conv -> BatchNorm neighbours in nn.Sequential were considered"))  # fmt: skip
        return _sequential_pairs(model)
    pairs = []
    for node in graph.module_nodes(primitives.CONVS):
        bn = graph.only_user(node, _BatchNorm) if graph.called_once(node) else None
        if bn is not None:
            pairs.append((node.target, bn.target))
        else:
            report.skipped.append((node.target, "its output does not go into a BatchNorm alone"))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for path, module in model.named_modules():
        if isinstance(module, nn.Sequential) and not isinstance(module, Squeezable):
            items = list(module.named_children())
            for (a, m), (b, n) in zip(items, items[1:], strict=False):
                if isinstance(m, primitives.CONVS) and isinstance(n, _BatchNorm):
                    prefix = f"{path}." if path else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs
