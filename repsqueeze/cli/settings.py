"""The settings of ``train.py`` (:data:`TRAIN_SCHEMA`) and ``deploy.py``
(:data:`DEPLOY_SCHEMA`): one line per setting (see :mod:`repsqueeze.cli.schema`), and the
checks of the files and folders they name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from repsqueeze.checkpoints import CheckpointError, read_checkpoint
from repsqueeze.cli.errors import DISK_FULL, SettingError, literal
from repsqueeze.cli.schema import (
    ANY,
    BOOL,
    FRACTION,
    OPTIONAL_STR,
    STR,
    TOLERANCE,
    Combination,
    Float,
    Int,
    Rule,
    Schema,
)  # fmt: skip
from repsqueeze.core.auto import MODES
from repsqueeze.models import list_models
from repsqueeze.zoo import list_blocks

# --- checks of files ------------------------------------------------------------------------------


def writable_folder(folder: str | Path) -> str | None:
    """A problem writing into ``folder`` (made if missing), or ``None``: tries a file there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = "no space left on the device" if err.errno in DISK_FULL else err.strerror
        return f"cannot write in {folder} ({reason})"
    return None


# --- train.py -----------------------------------------------------------------------------------

# What repsqueeze.training.lit.Classifier logs (acc_top5 with more than 5 classes).
METRICS = ["train/loss", "train/acc", "train/acc_top5", "val/loss", "val/acc", "val/acc_top5"]
METRICS += ["val/acc_best", "test/loss", "test/acc", "test/acc_top5", "test/acc_deployed"]
METRICS += ["test/max_logit_diff"]


def _run_mode(value: Any, cfg: DictConfig) -> str | None:
    """The blocks' run mode has one setting, ``model.mode``; the blocks' own ``mode``
    argument under ``model.net`` is refused, pointing there."""
    return f"the blocks' run mode is set by model.mode: use model.mode={literal(value)}"


def _accelerator(value: Any, cfg: DictConfig) -> str | None:
    """A Lightning accelerator that this machine has (``auto`` always)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry  # not on deploy.py's path

    known = ["auto", "gpu", *AcceleratorRegistry.available_accelerators()]
    if value not in known:
        return f"must be one of {', '.join(known)}"
    if value == "auto":
        return None
    if value == "gpu":
        available = torch.cuda.is_available() or torch.backends.mps.is_available()
    else:
        try:
            available = AcceleratorRegistry[value]["accelerator"].is_available()
        except Exception:  # a plugin whose own library is missing (torch_xla for tpu)
            available = False
    return (
        None if available else f"this machine has no {value}: use trainer.accelerator=cpu or auto"
    )


def _devices(value: Any, cfg: DictConfig) -> str | None:
    """``auto``, a count (-1: all), a list of indices, or ``"0,1"``."""
    if isinstance(value, list):
        ok = value and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    elif isinstance(value, str):
        ok = (
            value == "auto"
            or value.strip() == "-1"
            or all(p.strip().isdigit() for p in value.split(","))
        )
    else:
        ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)
    return None if ok else "must be auto, a count >= 1 (-1: all), or a list of device indices"


def _batches(value: Any, cfg: DictConfig) -> str | None:
    if isinstance(value, float) and not 0 <= value <= 1:
        return "a fraction of the batches must be in [0, 1]; a count is an integer >= 0"
    return None


def _output_folder(value: Any, cfg: DictConfig) -> str | None:
    return writable_folder(value)


def _train_checkpoint(value: Any, cfg: DictConfig) -> str | None:
    """The resume checkpoint exists, is a train.py checkpoint and holds this config's network."""
    if value == "last":
        where = Path(cfg.paths.log_dir, cfg.task_name, "runs")
        return f"no run under {where} has a checkpoints/last.ckpt to resume"
    if not Path(value).is_file():
        return "no such checkpoint file"
    try:
        saved = read_checkpoint(value).net_config
    except CheckpointError as err:
        return err.message.removeprefix(f"{value}: ").removeprefix(f"{value} ")
    wanted = cfg.model.net
    for key in sorted(set(saved) & set(wanted)):
        if wanted[key] is not None and saved[key] != wanted[key]:
            setting = "block" if key == "block" else f"model.net.{key}"  # the block group
            return (
                f"its network has {key}={literal(saved[key])}, the config "
                f"{key}={literal(wanted[key])}: set {setting}={literal(saved[key])} "
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
    if (
        not cfg.trainer.get("fast_dev_run")
        and low is not None
        and high not in (None, -1)
        and low > high
    ):
        return "trainer.min_epochs", f"must be <= trainer.max_epochs={high}"
    return None


def _ddp_needs_gpus(cfg: DictConfig) -> tuple[str, str] | None:

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
        "model.mode": Rule(type=str, nullable=True, choices=list(MODES)),
        "model.compile": Rule(type=(bool, dict)),
        "model.net.name": Rule(type=str, choices=list_models),
        "model.net.block": Rule(type=str, choices=list_blocks),
        "model.net.num_classes": Int(ge=1, nullable=True),
        "model.net.in_channels": Int(ge=1, nullable=True),
        "model.net.online_norm": BOOL,
        "model.net.mode": Rule(check=_run_mode),
        "optimizer.lr": Float(gt=0, why="a learning rate of 0 trains nothing"),
        "optimizer.weight_decay": Float(ge=0),
        "optimizer.momentum": Float(ge=0, lt=1),
        "scheduler.T_max": Int(ge=1),
        "scheduler.step_size": Int(ge=1),
        "scheduler.gamma": Float(gt=0),
        "scheduler.eta_min": Float(ge=0),
        "trainer.accelerator": Rule(type=str, check=_accelerator),
        "trainer.devices": Rule(check=_devices),
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
    if not isinstance(value, list) or not value or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):  # fmt: skip
        return "give [C,H,W] as positive integers"
    return None


def _device(value: Any, cfg: DictConfig) -> str | None:

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
    return None if Path(value).is_file() else "checkpoint not found"


DEPLOY_GROUPS = ("tol", "formats", "measure", "int8")

DEPLOY_SCHEMA = Schema(
    rules={
        "task_name": STR,
        "ckpt_path": Rule(type=str, check=_file),
        "output_dir": OPTIONAL_STR,
        "overwrite": BOOL,
        "seed": Rule(type=int),
        "batch_size": Int(ge=1),
        "input_shape": Rule(nullable=True, check=_shape),
        "use_data": BOOL,
        "device": Rule(type=str, check=_device),
        "threads": Int(ge=1, nullable=True),
        **dict.fromkeys(DEPLOY_GROUPS, ANY),
        **dict.fromkeys(["tol.float32", "tol.float64", "tol.export", "tol.onnx"], TOLERANCE),
        **dict.fromkeys(["formats.pt2", "formats.onnx", "formats.torchscript"], BOOL),
        "formats.onnx_opset": Int(check=_opset),
        "measure.enabled": BOOL,
        "measure.latency": BOOL,
        "measure.min_run_time": Float(gt=0),
        "int8.enabled": BOOL,
        "int8.max_drop": FRACTION,
        "int8.calibration_batches": Int(ge=1),
        "int8.calibration_method": Rule(type=str, choices=["minmax", "entropy", "percentile"]),
        "int8.cle": BOOL,
        "data": ANY,
        "paths": ANY,
        **dict.fromkeys(["paths.root_dir", "paths.data_dir", "paths.log_dir"], STR),
        "paths.output_dir": STR,
        "data.batch_size": Int(ge=1),
        "data.num_workers": Int(ge=0),
    },
    closed=("", *DEPLOY_GROUPS),
)

# Flat names of grouped deploy settings, with their place in the groups.
DEPLOY_MOVED = {
    **{f"tol_{k}": f"tol.{k}" for k in ("float32", "float64", "export", "onnx")},
    **{k: f"formats.{k}" for k in ("pt2", "onnx", "onnx_opset", "torchscript")},
    "latency": "measure.latency",
    "latency_min_run_time": "measure.min_run_time",
    **{f"int8_{k}": f"int8.{k}" for k in ("max_drop", "calibration_batches", "calibration_method")},
    "int8_cle": "int8.cle",
}
# a group given a plain value (int8=true): the setting it means
DEPLOY_SWITCHES = {"int8": "int8.enabled", "measure": "measure.enabled"}


def moved_deploy_setting(override: str) -> SettingError | None:
    """The refusal of a command-line override that names a grouped deploy setting by its flat
    name (``tol_float32=1e-6``) or gives a group a plain value (``int8=true``), or ``None``."""
    key, sep, value = override.lstrip("+~").partition("=")
    place = DEPLOY_MOVED.get(key)
    if key in DEPLOY_SWITCHES and sep and not value.startswith("{"):
        place = DEPLOY_SWITCHES[key]
    if place is None or override.startswith("-"):
        return None
    give = f"{place}={value}" if sep else place
    return SettingError(
        f"not a setting of this command; the setting is {place} (give {give})",
        key,
        *((value,) if sep else ()),
    )


def last_checkpoint(log_dir: str | Path, task_name: str) -> Path | None:
    """The newest ``<log_dir>/<task_name>/runs/*/checkpoints/last.ckpt``, or ``None``."""
    found = Path(log_dir, task_name, "runs").glob("*/checkpoints/last.ckpt")
    return max(found, key=lambda p: p.stat().st_mtime, default=None)
