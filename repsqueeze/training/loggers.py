"""What a training run logs, and where: Lightning's W&B and MLflow loggers behind the
``wandb`` / ``mlflow`` extras, the learning-rate monitor of the default callbacks, and a
filter that keeps a multi-process run's log lines to rank zero.

A logger whose package is missing is refused with one line that names the extra to install
(``pip install 'repsqueeze[wandb]'``), before anything is trained.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import callbacks
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from repsqueeze.errors import ConfigError


def _require(package: str, option: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"logger={option} needs the {package} package, which is not installed: "
            f"pip install 'repsqueeze[{option}]' (or choose another logger, e.g. logger=csv)"
        )


def wandb(**kwargs: Any) -> Logger:
    """Lightning's ``WandbLogger(**kwargs)``; needs the ``wandb`` extra."""
    _require("wandb", "wandb")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(**kwargs)


def mlflow(**kwargs: Any) -> Logger:
    """Lightning's ``MLFlowLogger(**kwargs)``; needs the ``mlflow`` extra."""
    _require("mlflow", "mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(**kwargs)


class LearningRateMonitor(callbacks.LearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (``lr-<optimizer>`` per step or epoch, as the
    scheduler steps), idle in a run without a logger (``logger=none``) instead of refusing
    to start."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class RankZeroFilter(logging.Filter):
    """A ``logging`` filter that passes records only in the process of global rank 0 (as
    Lightning's ``rank_zero_only`` knows it), so that a multi-process run logs each line once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(rank_zero_only, "rank", 0) == 0
