"""A registry of model constructors: ``create_model(name, **kwargs)``, as in timm."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any, TypeVar

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


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | Mapping = False,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    **kwargs,
) -> nn.Module:
    """Builds a registered model, optionally from published or saved weights, as in timm.

    Args:
        name: a name from :func:`list_models`.
        pretrained: ``False`` (fresh initialisation); ``True`` (the architecture's default
            published weights, through timm); ``"timm:<model>[.<tag>]"`` (those of a timm
            model and tag); a file path (repsqueeze's own checkpoint or state dict, timm's,
            or an official RepVGG / QARepVGG / MobileOne / DBB / ACNet one, training form or
            deployed, recognised from its keys); or a state dict. Another ``num_classes``
            re-initialises the head, another ``in_channels`` adapts the stem
            (timm's ``adapt_input_conv``); see :mod:`repsqueeze.models.pretrained`. What was
            loaded is logged and kept in the model's ``pretrained_report``.
        features_only: return a :class:`~repsqueeze.models.layers.FeatureNet`: the feature
            maps of ``out_indices`` instead of logits.
        out_indices: feature levels for ``features_only`` (0: the stem, ``i``: stage ``i``;
            default all).
        pretrained_cfg_overlay: passed to timm with a ``timm:`` or ``True`` source, e.g.
            ``{"file": PATH}`` to read timm's weights from a local file.
        **kwargs: arguments of the model's constructor (``block``, ``num_classes``,
            ``in_channels``, ``deployed``, ...) and of its blocks (``norm_layer``, ...).

    Raises:
        ValueError: an unknown name, ``num_classes`` / ``in_channels`` not a positive
            integer, weights that do not fit (one line naming keys and shapes), or
            ``features_only`` for a model without feature levels.
        TypeError: an argument that neither the model nor its blocks take; the message
            names the model and the arguments it takes.
        FileNotFoundError, OSError, ImportError: a missing file, weights timm could not
            fetch, timm not installed (``pip install 'repsqueeze[timm]'``).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    for arg in ("num_classes", "in_channels"):
        value = kwargs.get(arg, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
    try:
        model = _MODELS[name](**kwargs)
    except TypeError as err:
        match = _UNEXPECTED.search(str(err))
        if match is None or match.group(1) not in kwargs:
            raise
        raise TypeError(
            f"{name} got an unexpected keyword argument {match.group(1)!r}; it takes "
            f"{_arguments(_MODELS[name], kwargs.get('block', 'repvgg'))}"
        ) from err
    if pretrained is not False and pretrained is not None:
        from repsqueeze.models.pretrained import load_pretrained

        report = load_pretrained(model, pretrained, name, kwargs, pretrained_cfg_overlay)
        model.__dict__["pretrained_report"] = report
    if features_only:
        from repsqueeze.models.layers import FeatureNet

        info = getattr(model, "feature_info", None)
        if info is None:
            raise ValueError(f"{name}: features_only needs a model with feature_info levels")
        model = FeatureNet(model, range(len(info)) if out_indices is None else out_indices)
    return model


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
