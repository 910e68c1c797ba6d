"""What ``train.py`` and ``deploy.py`` share: the schema of their settings, checked before any
work, and the one error family and one-line printer for every failure.

The schema is one table per command line, one line per setting: a dotted key (``*`` matches
any one key, e.g. every callback) and its :class:`Rule` (type, bounds, choices, a check of a
file). :func:`validate` walks the composed config once: every key in the table is checked;
every node with a ``_target_`` is checked against the target's signature (unknown keys are
refused, naming them; values must fit the parameter annotations, e.g. Lightning's
``precision`` literals); keys of a closed node that the table does not list are refused.
Combinations of settings are :class:`Combination` entries of the same table. A new setting is
one line in ``TRAIN_SCHEMA`` (``train.py``) or ``DEPLOY_SCHEMA`` (``deploy.py``).

Errors: :class:`SettingError` (a :class:`repsqueeze.data.ConfigError`) names the setting,
its value and the fix; :func:`report` prints any exception as one line ``<prog>: error: ...``
(a full disk, a read-only folder, a library error with its type) and returns the exit status.
The library (``repsqueeze``) never imports Hydra; this module is the Hydra-facing side.
"""

from __future__ import annotations

import difflib
import errno
import inspect
import json
import os
import pickle
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from repsqueeze.data import ConfigError

_UNSET = object()


class SettingError(ConfigError):
    """A setting (or a file a setting names) that cannot work: one line, exit ``exit_code``.

    Args:
        message: what is wrong, and the fix when there is one.
        key: the setting, as a dotted Hydra key (``trainer.max_epochs``).
        value: its value.
        fix: a value that would work.
    """

    exit_code = 1


class RunInterrupted(SettingError):
    """Training stopped by a signal (SIGTERM: preemption, ``docker stop``) after saving
    ``last.ckpt``; exit status 143 (128 + SIGTERM), as the signal itself would give."""

    exit_code = 143


def literal(value: Any) -> str:
    """A value as a Hydra override writes it: ``true``, ``null``, ``0.1``, ``[1,8,8]``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(literal(v) for v in value) + "]"
    if isinstance(value, str) and value == "":
        return "''"
    return str(value)


# --- one line per failure ---------------------------------------------------------------------

_DISK = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def one_line(err: BaseException, folder_setting: str = "the output folder") -> str:
    """``err`` as one line: a :class:`ConfigError` as its rendering (the message of an error a
    DataLoader worker re-raised, not the worker's traceback); a full disk or a read-only
    folder as what to do about it (``folder_setting`` names the setting that moves the
    output); anything else with its type and a pointer to ``HYDRA_FULL_ERROR=1``."""
    os_error = _os_error(err)
    if os_error is not None:
        where = os_error.filename or "a file"
        if os_error.errno in _DISK:
            return (
                f"no space left on the device writing {where}: free disk space, or set "
                f"{folder_setting} to a folder on another disk"
            )
        if os_error.errno in _READ_ONLY:
            return (
                f"cannot write {where} ({os_error.strerror}): make it writable, or set "
                f"{folder_setting} to a writable folder"
            )
    text = err.render(literal=literal) if isinstance(err, ConfigError) else str(err).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    text = " ".join(text.split()) if isinstance(err, ConfigError) else _first_line(text)
    if isinstance(err, ConfigError):
        return text
    return f"{type(err).__name__}: {text} (HYDRA_FULL_ERROR=1 shows the traceback)"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, a cause, or a torch writer's message)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        text = str(seen)
        if "No space left on device" in text or "file write failed" in text:
            return OSError(errno.ENOSPC, "No space left on device", _quoted_file(text))
        seen = seen.__cause__ or seen.__context__
    return None


def _quoted_file(text: str) -> str | None:
    for word in text.split():
        if "/" in word:
            return word.strip("'\":,")
    return None


def report(prog: str, err: BaseException, folder_setting: str = "the output folder") -> int:
    """Prints ``err`` as ``<prog>: error: <one line>`` on stderr and returns its exit status
    (:attr:`SettingError.exit_code`, else 1). With ``HYDRA_FULL_ERROR=1`` the caller re-raises
    instead (see :func:`full_error`)."""
    print(f"{prog}: error: {one_line(err, folder_setting)}", file=sys.stderr, flush=True)
    return getattr(err, "exit_code", 1)


def full_error() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


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
    against its target's signature.

    Raises:
        SettingError: the first setting that breaks its rule, named as a Hydra key.
    """
    _walk(cfg, "", cfg, schema)
    for combination in schema.combinations:
        found = combination.problem(cfg)
        if found is not None:
            key, message = found
            raise SettingError(message, key, _get(cfg, key))


def _walk(node: DictConfig, prefix: str, cfg: DictConfig, schema: Schema) -> None:
    parameters = _parameters(node, prefix) if "_target_" in node else None
    for key in node:
        path = f"{prefix}{key}"
        value = _value(node, key, path)
        if _is_node_reference(node, key):
            continue  # e.g. model.optimizer: ${optimizer}, checked where it is defined
        rule = _rule(schema.rules, path)
        if isinstance(key, str) and key.startswith("_") and key.endswith("_"):
            continue  # _target_, _partial_, _convert_, _recursive_
        if parameters is not None and rule is None:
            _check_parameter(parameters, key, value, path, node)
        elif rule is None and prefix.rstrip(".") in schema.closed:
            known = sorted(k.rsplit(".", 1)[-1] for k in schema.rules if _parent(k) == prefix)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise SettingError(f"not a setting of this command; {hint}settings here: "
                               f"{', '.join(known)}", path, _plain(value))  # fmt: skip
        if rule is not None:
            param = parameters.get(key) if parameters else None
            _check_rule(rule, value, path, cfg, param)
        if isinstance(value, DictConfig):
            _walk(value, f"{path}.", cfg, schema)


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
    if expected is None and param is not None and not _fits(value, param):
        raise SettingError(f"must be {_annotation_name(param)}", path, value)
    for bound, holds, word in (
        (rule.ge, lambda b: value >= b, ">="),
        (rule.gt, lambda b: value > b, ">"),
        (rule.le, lambda b: value <= b, "<="),
        (rule.lt, lambda b: value < b, "<"),
    ):
        if bound is not None and isinstance(value, int | float) and not holds(bound):
            why = f" ({rule.why})" if rule.why else ""
            raise SettingError(f"must be {word} {bound:g}{why}", path, value)
    choices = rule.choices() if callable(rule.choices) else rule.choices
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SettingError(f"must be one of {', '.join(map(literal, choices))}{hint}", path, value)
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
        item = args[0] if args and (base is not tuple or len(args) == 2) else Any
        return all(_fits(v, item) for v in value)
    if base in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    if inspect.isclass(base) and base in (int, float, bool, str, list, dict):
        return isinstance(value, base)
    return True


def _annotation_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_annotation_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(literal(a) for a in args)
    if annotation is type(None):
        return "null"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation))


# --- checks of files ------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict:
    """A ``train.py`` (Lightning) checkpoint as plain data, loaded with ``weights_only=True``
    onto the CPU (no pickled code runs).

    Raises:
        SettingError: a missing, truncated or unsafe file, a deployed model, or a checkpoint
            without ``state_dict`` and ``net_config`` (the message names the file).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise SettingError(f"no such checkpoint file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SettingError(
            f"{path}: cannot be loaded safely (weights_only): not a PyTorch checkpoint, or it "
            "holds pickled Python objects, which are never run here"
        ) from err
    except Exception as err:  # torch raises several types for a truncated or foreign file
        raise SettingError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{_first_line(str(err))[:120]}); is the file complete?"
        ) from err
    if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("repsqueeze.deployed"):
        raise SettingError(
            f"{path} is already deployed (a deployed.pt written by save_deployed): load it "
            "with repsqueeze.load_deployed, or give the training checkpoint (checkpoints/*.ckpt)"
        )
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise SettingError(f"{path}: not a Lightning checkpoint (no state_dict)")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("net_config"), dict):
        raise SettingError(f"{path}: no net_config in its hyper-parameters; was it written by train.py?")  # fmt: skip
    return ckpt


def writable_folder(folder: str | Path) -> str | None:
    """A problem writing into ``folder`` (made if missing), or ``None``: tries a file there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = "no space left on the device" if err.errno in _DISK else err.strerror
        return f"cannot write in {folder} ({reason})"
    return None


# --- train.py -----------------------------------------------------------------------------------

# What repsqueeze.lit.Classifier logs (acc_top5 with more than 5 classes).
METRICS = ["train/loss", "train/acc", "train/acc_top5", "val/loss", "val/acc", "val/acc_top5"]
METRICS += ["val/acc_best", "test/loss", "test/acc", "test/acc_top5", "test/acc_deployed"]
METRICS += ["test/max_logit_diff"]


def _model_names() -> list[str]:
    from repsqueeze.models import list_models

    return list_models()


def _block_kinds() -> list[str]:
    from repsqueeze.zoo import BLOCKS

    return list(BLOCKS)


def _modes() -> list[str]:
    from repsqueeze.blocks import MODES

    return list(MODES)


def _accelerators() -> list[str]:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ["auto", "gpu", *AcceleratorRegistry.available_accelerators()]


def _batches(value: Any, cfg: DictConfig) -> str | None:
    if isinstance(value, float) and not 0 <= value <= 1:
        return "a fraction of the batches must be in [0, 1]; a count is an integer >= 0"
    return None


def _output_folder(value: Any, cfg: DictConfig) -> str | None:
    return writable_folder(value)


def _train_checkpoint(value: Any, cfg: DictConfig) -> str | None:
    """The resume checkpoint exists, is a train.py checkpoint and holds this config's network."""
    ckpt = read_checkpoint(value)
    saved = ckpt["hyper_parameters"]["net_config"]
    wanted = cfg.model.net
    for key in sorted(set(saved) & set(wanted)):
        if wanted[key] is not None and saved[key] != wanted[key]:
            return (
                f"its network has {key}={literal(saved[key])}, the config "
                f"{key}={literal(wanted[key])}: set model.net.{key}={literal(saved[key])} "
                "to resume it"
            )
    return None


def _nothing_trained(cfg: DictConfig) -> tuple[str, str] | None:
    trainer = cfg.trainer
    if trainer.get("fast_dev_run"):  # fast_dev_run overrides the limits
        return None
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        value = trainer.get(key)
        if value is not None and not isinstance(value, bool) and value == 0:
            return f"trainer.{key}", "nothing would be trained"
    return None


def _epochs_in_order(cfg: DictConfig) -> tuple[str, str] | None:
    low, high = cfg.trainer.get("min_epochs"), cfg.trainer.get("max_epochs")
    if low is not None and high not in (None, -1) and low > high:
        return "trainer.min_epochs", f"must be <= trainer.max_epochs={high}"
    return None


def _ddp_needs_gpus(cfg: DictConfig) -> tuple[str, str] | None:
    import torch

    trainer = cfg.trainer
    strategy = str(trainer.get("strategy") or "")
    accelerator = str(trainer.get("accelerator") or "auto")
    if not strategy.startswith("ddp") or torch.cuda.is_available():
        return None
    if accelerator in ("auto", "gpu", "cuda"):
        return "trainer.accelerator", (
            f"trainer.strategy={strategy} on {accelerator} needs CUDA GPUs and this machine "
            "has none: use trainer=ddp_cpu (CPU processes over gloo)"
        )
    if trainer.get("sync_batchnorm"):
        return "trainer.sync_batchnorm", (
            "DistributedDataParallel refuses SyncBatchNorm on CPU (SyncBatchNorm layers only "
            "work with GPU modules): set trainer.sync_batchnorm=false, or use trainer=ddp_cpu"
        )
    return None


TRAIN_SCHEMA = Schema(
    rules={
        "task_name": STR,
        "seed": Rule(type=int, nullable=True),
        "ckpt_path": Rule(type=str, nullable=True, check=_train_checkpoint),
        "resume": BOOL,
        "test": BOOL,
        "deploy": BOOL,
        "optimized_metric": Rule(type=str, nullable=True, choices=METRICS),
        **dict.fromkeys(["data", "model", "optimizer", "scheduler", "trainer"], ANY),
        **dict.fromkeys(["callbacks", "logger", "paths"], ANY),
        "paths.root_dir": STR,
        "paths.data_dir": STR,
        "paths.log_dir": STR,
        "paths.output_dir": Rule(type=str, check=_output_folder),
        "data.batch_size": Int(ge=1),
        "data.num_workers": Int(ge=0),
        "data.val_fraction": Float(gt=0, lt=1, why="validation picks the best checkpoint"),
        "data.test_fraction": Float(gt=0, lt=1),
        "data.val_size": Int(ge=1, why="validation picks the best checkpoint"),
        "data.image_size": Int(ge=1),
        "data.seed": Rule(type=int),
        "model.label_smoothing": Float(ge=0, lt=1),
        "model.deploy_tolerance": TOLERANCE,
        "model.mode": Rule(type=str, nullable=True, choices=_modes),
        "model.compile": Rule(type=(bool, dict)),
        "model.net.name": Rule(type=str, choices=_model_names),
        "model.net.block": Rule(type=str, choices=_block_kinds),
        "model.net.num_classes": Int(ge=1, nullable=True),
        "model.net.in_channels": Int(ge=1, nullable=True),
        "model.net.online_norm": BOOL,
        "optimizer.lr": Float(gt=0, why="a learning rate of 0 trains nothing"),
        "optimizer.weight_decay": Float(ge=0),
        "optimizer.momentum": Float(ge=0, lt=1),
        "scheduler.T_max": Int(ge=1),
        "scheduler.step_size": Int(ge=1),
        "scheduler.gamma": Float(gt=0),
        "scheduler.eta_min": Float(ge=0),
        "trainer.accelerator": Rule(type=str, choices=_accelerators),
        "trainer.max_epochs": Int(ge=-1, nullable=True, why="-1: no limit"),
        "trainer.min_epochs": Int(ge=0, nullable=True),
        "trainer.max_steps": Int(ge=-1),
        "trainer.check_val_every_n_epoch": Int(ge=1, nullable=True),
        "trainer.log_every_n_steps": Int(ge=1, nullable=True),
        "trainer.num_nodes": Int(ge=1),
        **{
            f"trainer.limit_{s}_batches": Rule(
                type=(int, float), nullable=True, ge=0, check=_batches
            )
            for s in ("train", "val", "test")
        },  # fmt: skip
        "callbacks.*.monitor": Rule(type=str, nullable=True, choices=METRICS),
        "callbacks.*.mode": Rule(type=str, choices=["min", "max"]),
        "callbacks.*.refresh_rate": Int(ge=0),
    },
    combinations=(
        Combination(_nothing_trained),
        Combination(_epochs_in_order),
        Combination(_ddp_needs_gpus),
    ),
)


# --- deploy.py ----------------------------------------------------------------------------------


def _opset_range() -> tuple[int, int]:
    """The ONNX opsets the installed exporter writes as asked: from the one its torchlib
    implements (lower ones are silently raised to it) to the newest the onnx package knows."""
    try:
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET
    except ImportError:  # a PyTorch that moved it: its documented minimum
        TORCHLIB_OPSET = 18  # noqa: N806
    try:
        import onnx

        newest = onnx.defs.onnx_opset_version()
    except ImportError:
        newest = TORCHLIB_OPSET
    return TORCHLIB_OPSET, newest


def _opset(value: Any, cfg: DictConfig) -> str | None:
    low, high = _opset_range()
    if not low <= value <= high:
        return f"the installed ONNX exporter writes opsets {low} to {high}"
    return None


def _shape(value: Any, cfg: DictConfig) -> str | None:
    if not value or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):  # fmt: skip
        return "give [C,H,W] as positive integers"
    return None


def _device(value: Any, cfg: DictConfig) -> str | None:
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        return "must be cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return "must be cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available here: set device=cpu"
    return None


def _file(value: Any, cfg: DictConfig) -> str | None:
    return None if Path(value).is_file() else "no such checkpoint file"


DEPLOY_SCHEMA = Schema(
    rules={
        "task_name": STR,
        "ckpt_path": Rule(type=str, check=_file),
        "output_dir": OPTIONAL_STR,
        "seed": Rule(type=int),
        "batch_size": Int(ge=1),
        "input_shape": Rule(type=list, nullable=True, check=_shape),
        "use_data": BOOL,
        "device": Rule(type=str, check=_device),
        **dict.fromkeys(["tol_float32", "tol_float64", "tol_export", "tol_onnx"], TOLERANCE),
        **dict.fromkeys(["pt2", "onnx", "torchscript", "measure", "int8", "int8_cle"], BOOL),
        "onnx_opset": Int(check=_opset),
        "latency_min_run_time": Float(gt=0),
        "int8_max_drop": FRACTION,
        "int8_calibration_batches": Int(ge=1),
        "int8_calibration_method": Rule(type=str, choices=["minmax", "entropy", "percentile"]),
        "data": ANY,
        "paths": ANY,
        **dict.fromkeys(["paths.root_dir", "paths.data_dir", "paths.log_dir"], STR),
        "paths.output_dir": STR,
        "data.batch_size": Int(ge=1),
        "data.num_workers": Int(ge=0),
    },
)
