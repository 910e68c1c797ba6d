"""A registry of model constructors, as in timm: ``register_model``, ``list_models``, and
:func:`build_model`, which resolves the block kind once and checks every argument against
the signatures of the model and of its blocks."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, TypeVar

from torch import nn

from repsqueeze.zoo import BlockFactory, block_factory
from repsqueeze.zoo.registry import GEOMETRY

_MODELS: dict[str, Callable[..., nn.Module]] = {}
Constructor = TypeVar("Constructor", bound=Callable[..., nn.Module])
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def register_model(fn: Constructor) -> Constructor:
    """Registers a model constructor under its function name; duplicate names are refused."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def unregister_model(name: str) -> Callable[..., nn.Module]:
    """Removes a registered model (one registered for a test or a notebook session).

    Returns:
        its constructor.

    Raises:
        ValueError: an unknown name, listing the registered ones.
    """
    get_model(name)
    return _MODELS.pop(name)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models that match a shell-style pattern, sorted.

    Args:
        pattern: an :mod:`fnmatch` pattern, e.g. ``"repvgg*"``; the default lists all.
    """
    return sorted(n for n in _MODELS if fnmatchcase(n, pattern))


def get_model(name: str) -> Callable[..., nn.Module]:
    """The constructor registered as ``name``.

    Raises:
        ValueError: an unknown name, listing the registered ones.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name]


@dataclass(frozen=True)
class Signature:
    """What a registered model takes, read from its signature.

    Attributes:
        own: the arguments of the model itself (those of the class it returns when it
            forwards ``**kwargs``).
        block: the default block kind, or ``None`` for a model without a ``block`` argument.
        open: whether the arguments cannot be known (``**kwargs`` to an unannotated model):
            they are passed on unchecked.
    """

    own: tuple[str, ...]
    block: Any
    open: bool


def signature(name: str) -> Signature:
    """The :class:`Signature` of the model registered as ``name``."""
    fn = get_model(name)
    params = inspect.signature(fn).parameters
    own = [p.name for p in params.values() if p.kind in _NAMED]
    block = params["block"].default if "block" in params else None
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return Signature(tuple(own), block, False)
    cls = inspect.signature(fn, eval_str=True).return_annotation
    if cls is inspect.Signature.empty or not inspect.isclass(cls):
        return Signature(tuple(own), block, True)
    inner = inspect.signature(cls).parameters
    own += [p.name for p in inner.values() if p.default is not p.empty and p.name not in own]
    if block is None and "block" in inner:
        block = inner["block"].default
    opened = any(p.kind == p.VAR_KEYWORD for p in inner.values())
    return Signature(tuple(own), block, opened)


def split_arguments(name: str, kwargs: Mapping[str, Any]) -> tuple[dict, BlockFactory | None]:
    """``kwargs`` of ``build_model(name, ...)`` as the model's own arguments and the block
    factory they describe (the kind resolved, the block arguments bound).

    Raises:
        ValueError: an unknown block kind, naming the valid ones.
        TypeError: an argument neither the model nor its blocks take, naming those they take.
    """
    sig = signature(name)
    if sig.open:
        return dict(kwargs), None
    own = {k: v for k, v in kwargs.items() if k in sig.own}
    rest = {k: v for k, v in kwargs.items() if k not in sig.own}
    if sig.block is None:
        for arg in rest:
            raise TypeError(
                f"{name} got an unexpected keyword argument {arg!r}; it takes {', '.join(sig.own)}"
            )
        return own, None
    factory = block_factory(own.get("block", sig.block))
    takes = factory.parameters()
    for arg in rest:
        if arg in GEOMETRY:
            raise TypeError(
                f"{name} got multiple values for argument {arg!r}: the model sets it for each block"
            )
        if arg not in takes:
            inner = [a for a in takes if a not in sig.own and a != "dims"]
            raise TypeError(
                f"{name} got an unexpected keyword argument {arg!r}; it takes "
                f"{', '.join(sig.own)}, and the arguments of a {factory.kind!r} block: "
                f"{', '.join(inner)}"
            )
    return own, factory.bind(**rest) if rest else factory


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """The model registered as ``name``, built with ``kwargs`` (the model's arguments and
    its blocks', see :func:`split_arguments`)."""
    own, factory = split_arguments(name, kwargs)
    if factory is not None:
        own["block"] = factory
    return get_model(name)(**own)
