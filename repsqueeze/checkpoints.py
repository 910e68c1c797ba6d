"""The one reader of ``train.py`` checkpoints (Lightning ``.ckpt`` files).

:func:`safe_load` reads any PyTorch file with ``torch.load(weights_only=True)`` onto the CPU:
no pickled code runs, and a checkpoint written on a GPU loads on a machine without one.
:func:`read_checkpoint` checks that the file is a ``train.py`` checkpoint and returns what
deploying or resuming needs (:class:`Checkpoint`); :func:`load_network` rebuilds the
training-form network from it, refusing NaN/Inf weights, negative running variances and
weights that do not fit the stored ``net_config``. Every refusal is one
:class:`CheckpointError` line naming the file.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repsqueeze import export
from repsqueeze.errors import ConfigError
from repsqueeze.models import create_model

# the Lightning module keeps the network as its attribute ``net``
NET_PREFIX = "net."


class CheckpointError(ConfigError):
    """A file that is not a usable ``train.py`` checkpoint; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    """A ``train.py`` checkpoint, checked.

    Attributes:
        path: the file.
        state_dict: the Lightning module's weights, as saved (network keys start with ``net.``).
        net_config: the keyword arguments of :func:`repsqueeze.create_model` that rebuild
            the network.
        hyper_parameters: everything the Lightning module saved (``net_config`` included).
        averaged: the run used weight averaging (EMA): ``state_dict`` holds the averaged
            weights.
    """

    path: Path
    state_dict: dict[str, Tensor]
    net_config: dict[str, Any]
    hyper_parameters: dict[str, Any]
    averaged: bool

    @property
    def net_state(self) -> dict[str, Tensor]:
        """The network's own weights (keys without the ``net.`` prefix)."""
        return {
            k.removeprefix(NET_PREFIX): v
            for k, v in self.state_dict.items()
            if k.startswith(NET_PREFIX)
        }


def safe_load(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain data only.

    Raises:
        CheckpointError: the file is missing, cut short, damaged, foreign, or holds pickled
            Python objects (never run here).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: cannot be loaded safely (weights_only): not a PyTorch checkpoint, or it "
            "holds pickled Python objects, which are never run here"
        ) from err
    except Exception as err:  # torch raises several types for a truncated or foreign file
        reason = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: "
            f"{reason[:120]}); is the file complete?"
        ) from err


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint at ``path``, loaded with :func:`safe_load` and checked.

    Raises:
        CheckpointError: see :func:`safe_load`; also a deployed model (``deployed.pt``), a file
            without ``state_dict`` or ``net_config``, or a ``net_config`` whose
            ``num_classes`` / ``in_channels`` is not a positive integer.
    """
    path = Path(path)
    ckpt = safe_load(path)
    if isinstance(ckpt, dict) and str(ckpt.get("format", "")).startswith("repsqueeze.deployed"):
        raise CheckpointError(
            f"{path} is already deployed (a deployed.pt written by save_deployed): load it "
            "with repsqueeze.load_deployed, or give the training checkpoint (checkpoints/*.ckpt)"
        )
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict)")
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("net_config"), dict):
        raise CheckpointError(
            f"{path}: no net_config in its hyper-parameters; was it written by train.py?"
        )
    net_config = dict(hparams["net_config"])
    for key in ("num_classes", "in_channels"):
        value = net_config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"{path}: net_config {key}={value!r}: must be a positive integer")
    # Lightning's WeightAveraging (EMA) callback saves the averaged weights as state_dict
    averaged = "current_model_state" in ckpt and "averaging_state" in ckpt
    return Checkpoint(path, ckpt["state_dict"], net_config, dict(hparams), averaged)


def load_network(checkpoint: Checkpoint | str | Path) -> nn.Module:
    """The training-form network of a checkpoint, in eval mode, on the CPU.

    Args:
        checkpoint: a :class:`Checkpoint`, or the path of one.

    Raises:
        CheckpointError: see :func:`read_checkpoint`; also NaN/Inf weights, negative running
            variances, a ``net_config`` that builds no network, or weights that do not fit it.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    path, net_config, state = checkpoint.path, checkpoint.net_config, checkpoint.net_state
    try:
        export.check_weights(state, str(path))
    except ValueError as err:
        raise CheckpointError(f"{err}; refusing to use it") from err
    try:
        net = create_model(**net_config)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: cannot rebuild the network from {net_config}: {err}"
        ) from err
    problem = export.state_dict_mismatch(net.state_dict(), state)
    if problem:
        raise CheckpointError(f"{path}: weights do not fit {net_config}: {problem}")
    net.load_state_dict(state, strict=True)
    return net.eval()
