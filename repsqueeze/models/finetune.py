"""Fine-tuning helpers: select parameters by name, freeze them (BatchNorm kept in eval), and
build optimizer parameter groups with their own learning-rate factor (e.g. for the head).

Patterns are shell-style (:mod:`fnmatch`) and match a parameter's full name
(``stages.0.1.0.branches.0.0.weight``) or the path of a module above it (``stem``,
``stages.0``, ``head``): ``"stem"`` selects everything in the stem.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Patterns = str | Sequence[str]


def _as_list(patterns: Patterns) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _matches(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def match_parameters(model: nn.Module, patterns: Patterns) -> list[str]:
    """Names of the parameters of ``model`` that ``patterns`` select, in model order.

    Args:
        model: any module.
        patterns: one pattern or several (``"stem"``, ``"stages.[01]"``, ``"*.bias"``).

    Raises:
        ValueError: a pattern that selects no parameter (named, with the top-level modules).
    """
    pats = _as_list(patterns)
    names = [n for n, _ in model.named_parameters()]
    for pat in pats:
        if not any(_matches(n, [pat]) for n in names):
            tops = ", ".join(n for n, _ in model.named_children())
            raise ValueError(
                f"parameter pattern {pat!r} matches no parameter of {type(model).__name__} "
                f"(its top-level modules: {tops})"
            )
    return [n for n in names if _matches(n, pats)]


class _FrozenNorm:
    """Mixin of a BatchNorm whose ``train()`` keeps it in eval (running statistics fixed)."""

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: eval whatever ``mode`` asks


_FROZEN: dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    if cls not in _FROZEN:
        _FROZEN[cls] = type(f"Frozen{cls.__name__}", (_FrozenNorm, cls), {})
        _FROZEN[cls].__module__ = __name__
        globals()[_FROZEN[cls].__name__] = _FROZEN[cls]  # importable, so it pickles
    return _FROZEN[cls]


for _norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    _frozen_class(_norm)  # defined at import, so a pickled frozen model loads elsewhere


def freeze(model: nn.Module, patterns: Patterns) -> list[str]:
    """Stops gradients of the selected parameters; BatchNorms all of whose parameters are
    selected stay in eval mode, also after ``model.train()`` (their statistics stop moving).

    A frozen BatchNorm is still a BatchNorm (a subclass), so blocks squeeze and deploy as
    before; :func:`unfreeze` gives it back its class.

    Args:
        model: any module.
        patterns: see :func:`match_parameters`.

    Returns:
        The names of the frozen parameters.
    """
    names = _set_trainable(model, patterns, False)
    for m, own in _own_parameters(model):
        if isinstance(m, _BatchNorm) and own and own <= set(names):
            if not isinstance(m, _FrozenNorm):
                m.__class__ = _frozen_class(type(m))
            m.eval()
    return names


def _set_trainable(model: nn.Module, patterns: Patterns, trainable: bool) -> list[str]:
    """Sets ``requires_grad`` of the parameters ``patterns`` selects; returns their names."""
    names = match_parameters(model, patterns)
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(trainable)
    return names


def _own_parameters(model: nn.Module) -> Iterator[tuple[nn.Module, set[str]]]:
    """Each module of ``model`` with the full names of the parameters it holds itself."""
    for path, m in model.named_modules():
        yield m, {f"{path}.{n}" if path else n for n, _ in m.named_parameters(recurse=False)}


def unfreeze(model: nn.Module, patterns: Patterns = "*") -> list[str]:
    """Undoes :func:`freeze` for the selected parameters (all by default).

    Returns:
        The names of the parameters that train again.
    """
    names = _set_trainable(model, patterns, True)
    for m, own in _own_parameters(model):
        if isinstance(m, _FrozenNorm) and own <= set(names):
            m.__class__ = type(m).__mro__[2]
            m.train(model.training)
    return names


def parameter_groups(
    model: nn.Module,
    rules: Mapping[str, Mapping[str, Any]] | Iterable[tuple[Patterns, Mapping[str, Any]]],
    lr: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: each trainable parameter goes to the first rule whose
    patterns select it, the rest to a last group with the optimizer's defaults.

    A rule's options are the group's (``weight_decay``, ``lr``, ...); ``lr_scale`` with
    ``lr`` given sets the group's learning rate to ``lr * lr_scale`` (timm's spelling), so
    a learning-rate scheduler scales every group alike. Frozen parameters are left out.

    Args:
        model: any module.
        rules: ``{pattern: options}`` or ``[(patterns, options), ...]``, e.g.
            ``{"head": {"lr_scale": 10.0}}``.
        lr: the base learning rate, needed for ``lr_scale``.

    Returns:
        ``[{"params": [...], "param_names": [...], **options}, ..., {"params": [...], "param_names": [...]}]``
        without empty groups.

    Raises:
        ValueError: a pattern that selects no parameter, or ``lr_scale`` without ``lr``.
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    taken: set[str] = set()
    groups = []
    for patterns, options in items:
        options = dict(options)
        scale = options.pop("lr_scale", None)
        if scale is not None:
            if lr is None:
                raise ValueError(f"parameter_groups: rule {patterns!r} has lr_scale but no lr")
            options["lr"] = lr * scale
        names = [n for n in match_parameters(model, patterns) if n in params and n not in taken]
        taken.update(names)
        groups.append({"params": [params[n] for n in names], "param_names": names, **options})
    rest = [n for n in params if n not in taken]
    groups.append({"params": [params[n] for n in rest], "param_names": rest})
    return [g for g in groups if g["params"]]
