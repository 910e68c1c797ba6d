"""A registry of model constructors: ``create_model(name, **kwargs)``, as in timm."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import TypeVar

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
Constructor = TypeVar("Constructor", bound=Callable[..., nn.Module])
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


def register_model(fn: Constructor) -> Constructor:
    """Registers a model constructor under its function name; duplicate names are refused."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """Builds a registered model.

    Args:
        name: a name from :func:`list_models`.
        pretrained: only ``False``: no weights ship with repsqueeze (``True`` raises and
            points to ``rs.from_timm``, which converts timm's trained RepVGG and MobileOne).
        **kwargs: arguments of the model's constructor (``block``, ``num_classes``,
            ``deployed``, ...) and of its blocks (``norm_layer``, ...).

    Raises:
        ValueError: an unknown name, ``pretrained=True``, or ``num_classes`` /
            ``in_channels`` not a positive integer.
        TypeError: an argument that neither the model nor its blocks take; the message
            names the model and the arguments it takes.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if pretrained:
        raise ValueError(
            f"{name}: no weights ship with repsqueeze (pretrained=True); use rs.from_timm to "
            "convert a pretrained timm RepVGG or MobileOne, or load your own checkpoint"
        )
    for arg in ("num_classes", "in_channels"):
        value = kwargs.get(arg, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as err:
        match = _UNEXPECTED.search(str(err))
        if match is None or match.group(1) not in kwargs:
            raise
        raise TypeError(
            f"{name} got an unexpected keyword argument {match.group(1)!r}; it takes "
            f"{_arguments(_MODELS[name], kwargs.get('block', 'repvgg'))}"
        ) from err


def _arguments(fn: Callable[..., nn.Module], block: str) -> str:
    """The keyword arguments ``fn`` names, then those of its block kind's constructor."""
    from repsqueeze.zoo import BLOCKS, make_block

    def named(f: Callable) -> list[str]:
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in inspect.signature(f).parameters.values() if p.kind in kinds]

    own = named(fn)
    cls = inspect.signature(fn, eval_str=True).return_annotation
    if inspect.isclass(cls) and any(
        p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()
    ):
        defaults = inspect.signature(cls).parameters.values()
        own += [p.name for p in defaults if p.default is not p.empty and p.name not in own]
    inner = named(make_block) + (named(BLOCKS[block]) if block in BLOCKS else [])
    fixed = {"kind", "in_channels", "out_channels", "kernel_size", "stride", "dims", *own}
    inner = [a for i, a in enumerate(inner) if a not in fixed and a not in inner[:i]]
    return f"{', '.join(own)}, and the arguments of a {block!r} block: {', '.join(inner)}"


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models that match a shell-style pattern, sorted.

    Args:
        pattern: an :mod:`fnmatch` pattern, e.g. ``"repvgg*"``; the default lists all.
    """
    return sorted(n for n in _MODELS if fnmatchcase(n, pattern))
