"""The checks ``train.py`` runs before anything is trained, and the Hydra helpers they share
with :mod:`repsqueeze.cli.train`: the data is loaded, the model's classes and channels are
taken from it, the optimizer is built once and the network runs on two samples, so that a
setting that cannot work fails with one line naming it, not after the trainer starts.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from repsqueeze.cli.errors import SettingError, literal
from repsqueeze.errors import ConfigError

# --- checks before training ----------------------------------------------------------------


def net_from_data(cfg: DictConfig, datamodule: L.LightningDataModule) -> dict[str, int]:
    """The ``model.net`` arguments the data gives: ``num_classes`` and ``in_channels`` of the
    data module where the config leaves them ``null`` (passed when the model is built; the
    composed config is left as it is). A value that contradicts the data raises
    :class:`ConfigError` naming both the model override and the data."""
    data_name = choice("data") or cfg.data.get("_target_", "?").rsplit(".", 1)[-1]
    given_by_data = {}
    for key, what in (("num_classes", "classes"), ("in_channels", "input channels")):
        expected = getattr(datamodule, key, None)
        given = cfg.model.net.get(key)
        if given is None:
            if expected is None:
                raise ConfigError(
                    f"the data (data={data_name}) does not tell its {what}; give it",
                    f"model.net.{key}",
                    given,
                )
            given_by_data[key] = expected
        elif expected is not None and given != expected:
            raise ConfigError(
                f"the data (data={data_name}) has {expected} {what}; leave it null to take "
                f"the data's, or choose data with {given} {what}",
                f"model.net.{key}",
                given,
            )
    return given_by_data


def check_optimizer(cfg: DictConfig, model: L.LightningModule) -> None:
    """Builds the optimizer and scheduler once, so that their arguments fail here."""
    optimizer = cfg.get("optimizer") or {}
    try:
        model.configure_optimizers()
    except (TypeError, ValueError) as err:
        target = optimizer.get("_target_", "the optimizer")
        raise ConfigError(
            f"{target} (or the scheduler) refuses its arguments: {err}; "
            "check the optimizer.* and scheduler.* overrides"
        ) from err


def prepare(datamodule: L.LightningDataModule, test: bool) -> None:
    """Downloads (when asked) and loads the data now, so that missing or unreadable data
    fails before the trainer starts. Lightning's own calls find it done."""
    try:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # Lightning's prepare_data convention
            datamodule.prepare_data()
        datamodule.setup("fit")
        if test:
            datamodule.setup("test")
    except ConfigError as err:
        raise ConfigError(err.render("data.", literal)) from err
    val_set = getattr(datamodule, "val_set", None)
    if val_set is not None and len(val_set) == 0:
        raise SettingError(
            "the data has no validation samples: without them no best checkpoint is chosen "
            "and the test and deploy check would run on the last weights; give the data a "
            "validation split (data.val_fraction, data.val_size, or a root/val folder)",
            "data",
        )


def check_forward(cfg: DictConfig, model: L.LightningModule, datamodule: L.LightningDataModule) -> None:  # fmt: skip
    """Runs a copy of the network in training mode on two training samples, so that a
    network that cannot train on this data (``model.mode=online`` with BatchNorm in the
    branches, an input too small for the stem, ...) fails here, not after the trainer starts.
    Data modules without a ``train_set`` are not checked."""
    dataset = getattr(datamodule, "train_set", None)
    if dataset is None or len(dataset) < 2:
        return
    x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(2)])  # (2, C, H, W)
    net = copy.deepcopy(model.net).train()  # the model's own BatchNorm statistics stay
    try:
        with torch.no_grad():
            net(x)
    except (ValueError, RuntimeError, TypeError, IndexError) as err:
        mode = cfg.model.get("mode")
        key, value = ("model.mode", mode) if mode == "online" else ("model.net.name", cfg.model.net.name)  # fmt: skip
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingError(f"the network cannot train on this data: {reason}", key, value) from err


def instantiate_group(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``; a constructor's refusal becomes :class:`ConfigError`
    naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            message = cause.render(f"{group}.", literal)
            raise ConfigError(message) from cause
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
        raise ConfigError(f"{group}: {reason.splitlines()[0]}") from err


def entries(group: DictConfig | None) -> list[DictConfig]:
    """The ``_target_`` entries of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    return [c for c in (group or {}).values() if c and "_target_" in c]


def choice(group: str) -> str | None:
    """The option chosen for a config group (``data=cifar10`` -> ``cifar10``) in a Hydra run."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)
