"""The settings schema: one table per command line, checked before any work.

A :class:`Schema` maps dotted keys (``*`` matches any one key, e.g. every callback) to a
:class:`Rule` (type, bounds, choices, a check of a file). :func:`validate` walks the composed
config once: every key the table lists is checked; every node with a ``_target_`` is checked
against the target's signature (unknown keys are refused, naming them; values must fit the
parameter annotations, e.g. Lightning's ``precision`` literals); keys of a closed node that
the table does not list are refused. Settings that only make sense together are
:class:`Combination` entries. The tables themselves are in :mod:`repsqueeze.cli.settings`.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from repsqueeze.cli.errors import SettingError, literal, not_one_of

# --- the schema ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What one setting must be.

    Args:
        type: the Python type(s) the value must have (``int``, ``float``, ``bool``, ``str``,
            ``list``, or a tuple of them); ``None`` takes the annotation of the ``_target_``
            parameter when there is one. ``bool`` never passes for ``int`` or ``float``.
        nullable: ``null`` is allowed.
        ge, gt, le, lt: bounds.
        choices: allowed values, or a function returning them.
        check: ``check(value, cfg) -> problem or None``, for what a type cannot say (a file
            that must be a checkpoint, a folder that must be writable).
        why: appended to a bound's refusal (what the bound protects against).
    """

    type: Any = None
    nullable: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: Sequence | Callable[[], Sequence] | None = None
    check: Callable[[Any, DictConfig], str | None] | None = None
    why: str = ""


def Int(**bounds: Any) -> Rule:  # noqa: N802  (rule constructors read like types)
    return Rule(type=int, **bounds)


def Float(**bounds: Any) -> Rule:  # noqa: N802
    return Rule(type=float, **bounds)


BOOL = Rule(type=bool)
STR = Rule(type=str)
OPTIONAL_STR = Rule(type=str, nullable=True)
FRACTION = Float(ge=0, le=1)
TOLERANCE = Float(ge=0)
ANY = Rule()


@dataclass(frozen=True)
class Combination:
    """A rule over several settings: ``problem(cfg)`` returns ``(key, message)`` for the
    setting to change, or ``None`` when the combination makes sense."""

    problem: Callable[[DictConfig], tuple[str, str] | None]


@dataclass(frozen=True)
class Schema:
    """The settings of one command line: ``rules`` by dotted key, ``closed`` nodes (their
    keys must all be in ``rules``; ``""`` is the root), and the ``combinations``."""

    rules: Mapping[str, Rule]
    closed: tuple[str, ...] = ("",)
    combinations: tuple[Combination, ...] = ()


def validate(cfg: DictConfig, schema: Schema) -> None:
    """Checks every setting of ``cfg`` against ``schema``, and every ``_target_`` node
    against its target's signature. Settings given as values are checked first, then the
    combinations, then the settings that copy another (``scheduler.T_max:
    ${trainer.max_epochs}``), so a mistake is named where it was made.

    Raises:
        SettingError: the first setting that breaks its rule, named as a Hydra key.
    """
    checks: list[tuple[bool, Callable[[], None]]] = []
    _walk(cfg, "", cfg, schema, checks)
    for copied, check in checks:
        if not copied:
            check()
    for combination in schema.combinations:
        found = combination.problem(cfg)
        if found is not None:
            key, message = found
            raise SettingError(message, key, _get(cfg, key))
    for copied, check in checks:
        if copied:
            check()


def _walk(node: DictConfig, prefix: str, cfg: DictConfig, schema: Schema, checks: list) -> None:
    parameters = _parameters(node, prefix) if "_target_" in node else None
    for key in node:
        path = f"{prefix}{key}"
        value = _value(node, key, path)
        if _is_node_reference(node, key):
            continue  # e.g. model.optimizer: ${optimizer}, checked where it is defined
        if isinstance(key, str) and key.startswith("_") and key.endswith("_"):
            continue  # _target_, _partial_, _convert_, _recursive_
        copied = node._get_node(key)._is_interpolation()
        rule = _rule(schema.rules, path)
        if parameters is not None and rule is None:
            checks.append((copied, functools.partial(_check_parameter, parameters, key, value, path, node)))  # fmt: skip
        elif rule is None and prefix.rstrip(".") in schema.closed:
            known = sorted(k.rsplit(".", 1)[-1] for k in schema.rules if _parent(k) == prefix)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            while isinstance(value, DictConfig) and len(value) > 0:  # +model.net.block=x
                first = next(iter(value))
                path, value = f"{path}.{first}", value[first]
            raise SettingError(f"not a setting of this command; {hint}settings here: "
                               f"{', '.join(known)}", path, _plain(value))  # fmt: skip
        if rule is not None:
            param = parameters.get(key) if parameters else None
            checks.append((copied, functools.partial(_check_rule, rule, value, path, cfg, param)))  # fmt: skip
        if isinstance(value, DictConfig):
            _walk(value, f"{path}.", cfg, schema, checks)


def _value(node: DictConfig, key: Any, path: str) -> Any:
    try:
        return node[key]
    except OmegaConfBaseException as err:
        message = str(err).splitlines()[0]
        if OmegaConf.is_missing(node, key):
            message = "must be given"
        raise SettingError(message, path) from err


def _is_node_reference(node: DictConfig, key: Any) -> bool:
    child = node._get_node(key)
    if child is None or not child._is_interpolation():
        return False
    return isinstance(node[key], DictConfig | ListConfig)


def _parent(key: str) -> str:
    return key.rsplit(".", 1)[0] + "." if "." in key else ""


def _rule(rules: Mapping[str, Rule], path: str) -> Rule | None:
    if path in rules:
        return rules[path]
    parts = path.split(".")
    for pattern, rule in rules.items():
        pieces = pattern.split(".")
        if len(pieces) == len(parts) and all(p in ("*", q) for p, q in zip(pieces, parts)):  # noqa: B905
            return rule
    return None


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    return _plain(value)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _check_rule(rule: Rule, value: Any, path: str, cfg: DictConfig, param: Any) -> None:
    value = _plain(value)
    if value is None:
        if rule.nullable or (rule.type is None and param is not None and _accepts_none(param)):
            return
        if rule.type is not None or rule.choices is not None or rule.check is not None:
            raise SettingError("must be given (not null)", path, value)
    expected = rule.type
    if expected is not None and not _is_instance(value, expected):
        raise SettingError(f"must be {_type_name(expected)}", path, value)
    if expected is None and rule.check is None and param is not None and not _fits(value, param):
        raise SettingError(f"must be {_annotation_name(param)}", path, value)
    for bound, holds, word in (
        (rule.ge, lambda b: value >= b, ">="),
        (rule.gt, lambda b: value > b, ">"),
        (rule.le, lambda b: value <= b, "<="),
        (rule.lt, lambda b: value < b, "<"),
    ):
        if bound is not None and isinstance(value, int | float) and not holds(bound):
            why = f" ({rule.why})" if rule.why else ""
            what = f"must be {word} {bound:g}"
            if rule.type is int and (word, bound) == (">=", 1):
                what = "must be a positive integer"
            elif rule.type is int and (word, bound) == (">=", 0):
                what = "must be an integer >= 0"
            raise SettingError(f"{what}{why}", path, value)
    choices = rule.choices() if callable(rule.choices) else rule.choices
    if choices is not None and value not in choices:
        raise SettingError(not_one_of(value, choices), path, value)
    if rule.check is not None:
        problem = rule.check(value, cfg)
        if problem:
            raise SettingError(problem, path, value)


def _is_instance(value: Any, expected: Any) -> bool:
    expected = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool):
        return bool in expected
    if isinstance(value, int) and float in expected:
        return True
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    names[list] = "a list"
    expected = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(names.get(t, t.__name__) for t in expected)


# --- _target_ nodes: their signature ----------------------------------------------------------


def _parameters(node: DictConfig, prefix: str) -> dict[str, Any] | None:
    """``{name: annotation}`` of the parameters the target takes (``None`` when it takes any
    keyword, e.g. ``**kwargs`` that go on to another library)."""
    from hydra.utils import get_object

    target = node._target_
    try:
        obj = get_object(target)
    except Exception as err:
        raise SettingError(f"cannot import {target}: {err}", f"{prefix}_target_", target) from err
    params: dict[str, Any] = {}
    for fn in _signature_chain(obj):
        try:
            hints = typing.get_type_hints(fn)
        except Exception:
            hints = {}
        signature = inspect.signature(fn)
        open_kwargs = False
        for name, p in signature.parameters.items():
            if p.kind is p.VAR_KEYWORD:
                open_kwargs = True
            elif p.kind is not p.VAR_POSITIONAL and name != "self":
                annotation = hints.get(name, p.annotation)
                params.setdefault(name, Any if isinstance(annotation, str) else annotation)
        if not open_kwargs:
            return params
    return None


def _signature_chain(obj: Any) -> list[Callable]:
    """The callables whose parameters ``obj`` takes: its ``__init__``, then, while each one
    passes ``**kwargs`` on, its base classes' ``__init__`` (``CIFAR10DataModule(**kwargs)``)."""
    if not inspect.isclass(obj):
        return [obj]
    chain = []
    for cls in obj.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None and cls is not object:
            chain.append(init)
    return chain or [obj]


def _check_parameter(params: dict | None, key: Any, value: Any, path: str, node: DictConfig) -> None:  # fmt: skip
    if params is None:
        return
    if key not in params:
        close = difflib.get_close_matches(str(key), list(params), n=1)
        hint = f"did you mean {_parent(path)}{close[0]}? " if close else ""
        raise SettingError(
            f"{node._target_} takes no argument {key!r}; {hint}it takes {', '.join(params)}",
            path,
            _plain(value),
        )
    if isinstance(value, DictConfig) and "_target_" in value:
        return  # built by Hydra, checked on its own
    if not _fits(_plain(value), params[key]):
        raise SettingError(f"must be {_annotation_name(params[key])}", path, _plain(value))


def _accepts_none(annotation: Any) -> bool:
    return annotation is Any or _fits(None, annotation)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a plain config value (None, bool, int, float, str, list, dict) fits a
    parameter annotation; what cannot be decided from a config value (classes, callables,
    unknown generics) passes: the constructor still checks it."""
    if annotation in (Any, inspect.Parameter.empty) or isinstance(annotation, typing.TypeVar):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is type(None) or annotation is None:
        return value is None
    if value is None:
        return False
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (Path, os.PathLike) or origin is os.PathLike:
        return isinstance(value, str)
    base = origin or annotation
    if base in (list, tuple, Sequence, typing.Sequence):
        if not isinstance(value, list | tuple):
            return False
        if base is tuple and args and args[-1] is not Ellipsis:  # tuple[X, Y]: fixed length
            return len(value) == len(args) and all(map(_fits, value, args))
        item = args[0] if args else Any
        return all(_fits(v, item) for v in value)
    if base in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    if inspect.isclass(base) and base in (int, float, bool, str, list, dict):
        return isinstance(value, base)
    return True


def _annotation_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        literals = [v for a in args for v in _literals(a)]
        others = [a for a in args if not _literals(a)]
        names = [f"one of {', '.join(dict.fromkeys(map(literal, literals)))}"] if literals else []
        return " or ".join(names + [_annotation_name(a) for a in others])
    if origin is typing.Literal:
        return "one of " + ", ".join(literal(a) for a in args)
    if annotation is type(None):
        return "null"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


def _literals(annotation: Any) -> list:
    """The values of a ``Literal`` (or of a union of them), else ``[]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return list(args)
    if origin in (typing.Union, types.UnionType):
        values = [_literals(a) for a in args]
        return [v for vs in values for v in vs] if all(values) else []
    return []
