"""The deployed-model file ``deployed.pt``: weights, each convolution's geometry and the
architecture that rebuilds it, checked on save and on load.

``deployed.pt`` stores each convolution's geometry and is refused when its ``arch`` rebuilds
anything else; it is loaded with ``weights_only=True`` (no pickled code runs) and written
atomically.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from repsqueeze.export.checks import check_weights
from repsqueeze.files import save_atomic
from repsqueeze.models import create_model

FORMAT = "repsqueeze.deployed/2"
# Written before each convolution's geometry was stored: loaded unchecked, with a warning.
FORMAT_WITHOUT_GEOMETRY = "repsqueeze.deployed/1"
GEOMETRY_FIELDS = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def conv_geometry(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {kernel_size, stride, padding, dilation, groups, padding_mode, ...}}``
    for every convolution of ``model``: what a state dict's shapes cannot tell."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = {
                "type": type(m).__name__,
                "in_channels": m.in_channels,
                "out_channels": m.out_channels,
                "bias": m.bias is not None,
                **{f: _plain(getattr(m, f)) for f in GEOMETRY_FIELDS},
            }
    return out


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (tuple, list)) else value


def geometry_mismatch(expected: dict[str, dict], actual: dict[str, dict]) -> str | None:
    """The first difference between two :func:`conv_geometry` results, or ``None``."""
    for name in expected.keys() - actual.keys():
        return f"layer {name!r} ({expected[name]['type']}) is missing"
    for name in actual.keys() - expected.keys():
        return f"layer {name!r} ({actual[name]['type']}) is not expected"
    for name, fields in expected.items():
        for field, value in fields.items():
            if _plain(actual[name].get(field)) != _plain(value):
                return f"layer {name!r}: {field} is {value!r}, rebuilt {actual[name].get(field)!r}"
    return None


def state_dict_mismatch(
    expected: Mapping[str, Tensor], given: Mapping[str, Tensor], limit: int = 4
) -> str | None:
    """Missing keys, unexpected keys and shape differences of ``given`` against ``expected``,
    as one line (at most ``limit`` of each), or ``None`` when every tensor fits."""

    def clip(items: list[str]) -> str:
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)} expected"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing {clip(missing)}")
    if unexpected:
        parts.append(f"unexpected {clip(unexpected)}")
    if shapes:
        parts.append(f"shape of {clip(shapes)}")
    return "; ".join(parts) or None


def _build_deployed(arch: dict, where: str) -> nn.Module:
    try:
        return create_model(**{**arch, "deployed": True})
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{where}: arch {arch} builds no model: {err}") from err


# --- deployed.pt -------------------------------------------------------------------------------
def save_deployed(
    model: nn.Module, path: str | Path, arch: dict, extra: dict | None = None
) -> None:
    """Writes ``deployed.pt``: the deployed state dict, each convolution's geometry and what
    rebuilds the architecture.

    Args:
        model: a deployed model (see :func:`repsqueeze.deploy`).
        path: file to write.
        arch: keyword arguments of :func:`repsqueeze.models.create_model` (``name`` included)
            that build this model; saved as plain data, so loading runs no pickled code.
        extra: more plain data to store (e.g. verification results).

    Raises:
        ValueError: a weight is NaN/Inf, or ``arch`` does not rebuild ``model`` (a layer's
            geometry or a tensor's shape differs; the message names the layer and field).
    """
    where = f"save_deployed({path})"
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    check_weights(state, where)
    geometry = conv_geometry(model)
    rebuilt = _build_deployed(dict(arch), where)
    problem = geometry_mismatch(geometry, conv_geometry(rebuilt)) or state_dict_mismatch(
        rebuilt.state_dict(), state
    )
    if problem:
        raise ValueError(f"{where}: arch {dict(arch)} does not rebuild this model: {problem}")
    payload = {
        "format": FORMAT,
        "arch": dict(arch),
        "geometry": geometry,
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    save_atomic(path, lambda f: torch.save(payload, f))


def load_deployed(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """A ready-to-run model from ``deployed.pt``; the training branches are never built.

    The architecture is rebuilt with ``create_model(..., deployed=True)`` (branches exist
    only on the meta device), every convolution's geometry is checked against the one
    stored, and the weights load with ``strict=True``. Files of the older format
    ``repsqueeze.deployed/1`` (no geometry stored) load with a warning.

    Args:
        path: a file written by :func:`save_deployed`.
        map_location: device for the weights.

    Raises:
        ValueError: not a deployed model file (truncated, damaged, or holding objects other
            than tensors and plain data), a key missing, NaN/Inf weights, or a rebuilt layer
            that differs from the stored one (named with the field). Each names the file.
        OSError: the file cannot be opened (its own message names it).
    """
    payload = _read_deployed(path, map_location)
    formats = (FORMAT, FORMAT_WITHOUT_GEOMETRY)
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        raise ValueError(f"{path}: not a repsqueeze deployed model (expected format {FORMAT!r})")
    required = ("arch", "state_dict") + (("geometry",) if payload["format"] == FORMAT else ())
    for key in required:
        if not isinstance(payload.get(key), dict):
            raise ValueError(f"{path}: corrupt deployed model: no {key!r} dict in the file")
    check_weights(payload["state_dict"], str(path))
    model = _build_deployed(payload["arch"], str(path))
    if payload["format"] == FORMAT_WITHOUT_GEOMETRY:
        warnings.warn(
            f"{path}: written before layer geometry was stored ({FORMAT_WITHOUT_GEOMETRY}); "
            "its architecture is rebuilt from 'arch' unchecked; save it again to check it",
            UserWarning,
            stacklevel=2,
        )
    else:
        problem = geometry_mismatch(payload["geometry"], conv_geometry(model))
        if problem:
            raise ValueError(
                f"{path}: arch {payload['arch']} does not rebuild the stored model: {problem}"
            )
    problem = state_dict_mismatch(model.state_dict(), payload["state_dict"])
    if problem:
        raise ValueError(f"{path}: weights do not fit arch {payload['arch']}: {problem}")
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(map_location).eval()


def _read_deployed(path: str | Path, map_location: str | torch.device) -> object:
    """``torch.load(path, weights_only=True)``; a file that is cut short, damaged or holds
    anything but tensors and plain data is one ``ValueError`` naming the file."""
    if isinstance(map_location, str):
        try:
            torch.device(map_location)
        except RuntimeError as err:
            raise ValueError(f"load_deployed: map_location={map_location!r}: {err}") from err
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save's format; every entry has a CRC
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as err:
        raise ValueError(
            f"{path}: not a complete deployed model file ({err}): truncated, damaged, or not written by "
            "save_deployed"
        ) from err
    if damaged is not None:
        raise ValueError(
            f"{path}: damaged: entry {damaged.partition('/')[2] or damaged} fails its checksum "
            "(the file changed after it was written); write it again"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"it references {found.group(1)}" if found else str(err).splitlines()[0]
        raise ValueError(
            f"{path}: refused: it holds objects other than tensors and plain data, which "
            f"save_deployed never writes ({what}); nothing in it was run"
        ) from err
    except (RuntimeError, EOFError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable deployed model file ({first})") from err
