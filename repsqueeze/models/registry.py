"""A registry of model constructors: ``create_model(name, **kwargs)``, as in timm."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
Constructor = TypeVar("Constructor", bound=Callable[..., nn.Module])


def register_model(fn: Constructor) -> Constructor:
    """Registers a model constructor under its function name; duplicate names are refused."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def create_model(name: str, **kwargs) -> nn.Module:
    """Builds a registered model.

    Args:
        name: a name from :func:`list_models`.
        **kwargs: arguments of the model's constructor (``block``, ``num_classes``,
            ``deployed``, ...).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)
