"""Verified export of deployed models: deployed.pt, torch.export, ONNX, and their measurements.

Users of RepVGG, MobileOne and DBB most often report "outputs differ after deploy" and "ONNX
export fails". Everything here checks before it writes: :func:`verify` measures the largest
relative difference between training and deployed forms (TF32 off), ``deployed.pt`` stores
each convolution's geometry and is refused when its ``arch`` rebuilds anything else, and
every file is written atomically (a temporary name, then a rename). Multiply-accumulates come
from ``torch.utils.flop_counter`` and latencies from ``torch.utils.benchmark``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import math
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from repsqueeze.core import primitives
from repsqueeze.core.numerics import strict_fp32

FORMAT = "repsqueeze.deployed/2"
# Written before each convolution's geometry was stored: loaded unchecked, with a warning.
FORMAT_WITHOUT_GEOMETRY = "repsqueeze.deployed/1"
GEOMETRY_FIELDS = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")
ONNX_HINT = (
    "ONNX export needs onnx, onnxruntime and onnxscript: pip install 'repsqueeze[export]', "
    "or onnx=false"
)


# --- atomic files ----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keeps the suffix: torch.export.save warns about a file not ending in .pt2
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_atomic(path: str | Path, write: Callable[[io.BytesIO], Any]) -> None:
    """Writes what ``write(buffer)`` serializes to ``path`` atomically: into memory first,
    then to disk from Python, so that a full disk is an ``OSError`` naming the file (PyTorch's
    zip writer aborts the process when a write fails, e.g. ``torch.save`` on a full disk).

    Args:
        path: the file to (re)place.
        write: e.g. ``lambda f: torch.save(obj, f)``.
    """
    buffer = io.BytesIO()
    write(buffer)
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(buffer.getbuffer())
        except OSError as err:
            err.filename = err.filename or str(path)
            raise


# --- checks on weights and architecture ------------------------------------------------------
def check_weights(state_dict: Mapping[str, Tensor], where: str) -> None:
    """Refuses NaN/Inf in any floating tensor and a negative BatchNorm ``running_var``.

    Args:
        state_dict: the tensors to check.
        where: what they come from, for the message (a file, a function).

    Raises:
        ValueError: naming the first offending key.
    """
    floats = {
        k: v for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point()
    }
    roots = [v.sqrt() for k, v in floats.items() if k.endswith("running_var")]  # nan if < 0
    if primitives.all_finite([*floats.values(), *roots]):  # at once; key by key to name one
        return
    for key, value in state_dict.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{where}: {key} holds {bad} NaN/Inf value(s)")
        if key.endswith("running_var") and bool((value < 0).any()):
            raise ValueError(
                f"{where}: {key} has negative entries (min {float(value.min()):.3g}); a "
                "variance is never negative"
            )


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
    from repsqueeze.models import create_model

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


# --- verification --------------------------------------------------------------------------
@torch.no_grad()
def relative_error(
    reference: nn.Module, candidate: nn.Module, x: Tensor, dtype: torch.dtype
) -> float:
    """``max|ref(x) - cand(x)| / max|ref(x)|`` with both models and ``x`` cast to ``dtype``."""
    ref = copy.deepcopy(reference).to(dtype).eval()
    cand = copy.deepcopy(candidate).to(dtype).eval()
    x = x.to(dtype)
    a, b = ref(x), cand(x)
    scale = a.abs().max().clamp_min(torch.finfo(dtype).tiny)
    return float((a - b).abs().max() / scale)


def verify(
    training: nn.Module,
    deployed: nn.Module,
    inputs: dict[str, Tensor],
    tol32: float = 1e-5,
    tol64: float = 1e-10,
) -> dict[str, dict[str, float]]:
    """Largest relative difference between the two forms, per input and dtype.

    float64 checks the squeeze itself: a float64 copy of the training form against its own
    deployment, so float32 rounding of the stored weights cannot hide an error. float32
    checks the artifact: ``deployed`` as it will be written, against the training form.
    Both run with TF32 off (:func:`repsqueeze.core.numerics.strict_fp32`): on a GPU, TF32 noise
    (about 1e-4) would otherwise be measured instead of the squeeze. Inputs run on the
    models' device.

    Args:
        training: the model in training form.
        deployed: the deployed model.
        inputs: named input batches (e.g. ``{"random": ..., "data": ...}``).
        tol32: tolerance in float32.
        tol64: tolerance in float64.

    Returns:
        ``{input name: {"float32": err, "float64": err}}``.

    Raises:
        ValueError: a tolerance is exceeded; the message says where and by how much.
    """
    from repsqueeze.convert import deploy

    exact = copy.deepcopy(training).double()
    exact_deployed = deploy(exact)
    device = next((t.device for t in training.parameters()), torch.device("cpu"))
    report = {}
    with strict_fp32():
        for name, x in inputs.items():
            x = x.to(device)
            report[name] = {
                "float64": relative_error(exact, exact_deployed, x, torch.float64),
                "float32": relative_error(training, deployed, x, torch.float32),
            }
            for dtype, tol in (("float64", tol64), ("float32", tol32)):
                if not report[name][dtype] <= tol:
                    raise ValueError(
                        f"deployed model differs from the training form on {name} input in "
                        f"{dtype}: relative error {report[name][dtype]:.3e} > tolerance {tol:.0e}"
                    )
    return report


def has_blocks(model: nn.Module) -> bool:
    """Whether ``model`` holds a re-parameterizable block still in training form."""
    from repsqueeze.core.blocks import Squeezable

    return any(isinstance(m, Squeezable) and not m.deployed for m in model.modules())


# --- torch.export, ONNX and TorchScript ------------------------------------------------------
def export_program(model: nn.Module, example: Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the (deployed, eval-mode) model with a dynamic batch axis.

    Args:
        model: the model.
        example: an input batch; its batch size must be at least 2 (``torch.export``
            specializes a size-1 axis).
    """
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:])
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


def to_pt2(model: nn.Module, path: str | Path, example: Tensor) -> torch.export.ExportedProgram:
    """Writes ``model.pt2`` (:func:`export_program` saved with ``torch.export.save``)
    atomically; reload it with ``torch.export.load(path).module()``."""
    program = export_program(model, example)
    save_atomic(path, lambda f: torch.export.save(program, f))
    return program


def load_pt2(path: str | Path) -> nn.Module:
    """The callable module of a ``model.pt2`` file."""
    return torch.export.load(str(path)).module()


def to_torchscript(model: nn.Module, path: str | Path, example: Tensor) -> None:
    """Traces the (deployed, eval-mode) model and saves it atomically (TorchScript is
    deprecated in PyTorch; prefer :func:`to_pt2`)."""
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))


def require_onnx() -> None:
    """Raises ``ModuleNotFoundError`` with :data:`ONNX_HINT` unless onnx, onnxruntime and
    onnxscript can all be imported."""
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ModuleNotFoundError(f"{ONNX_HINT} (no module {name!r})", name=name) from err


def to_onnx(
    model: nn.Module | torch.export.ExportedProgram,
    path: str | Path,
    example: Tensor,
    opset: int = 18,
) -> None:
    """Exports to ONNX with a dynamic batch axis, atomically, with PyTorch's
    ``torch.export``-based exporter (the TorchScript-based one is deprecated).

    Args:
        model: the deployed model, or its :func:`export_program` (saves exporting twice).
        path: file to write.
        example: an input batch.
        opset: ONNX opset version.
    """
    require_onnx()
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    program = program or export_program(model, example)
    with atomic_path(path) as tmp, torch.no_grad(), _quiet("onnxscript", "onnx_ir"):
        torch.onnx.export(
            program,
            (example,),
            str(tmp),
            input_names=["input"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            verbose=False,
            external_data=False,
        )


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Raises the given loggers to WARNING for the region (the ONNX optimizer's passes log
    every step at INFO, which a Hydra app prints)."""
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run_onnx(path: str | Path, x: Tensor) -> Tensor:
    """Runs an ONNX file in onnxruntime on CPU."""
    require_onnx()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().numpy()})
    return torch.from_numpy(out)


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# --- measurements ----------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates of one eval-mode forward pass over ``x``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` over the aten operations that
    actually run (convolutions, matrix products; a multiply-accumulate is two FLOPs), so a
    training-form block is counted as it computes: a chain's inner layers over the padded
    border too, an online block's kernel composition too. The model's mode is restored.
    """
    training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2


def latency(fn: Callable[[], object], min_run_time: float = 0.3, blocks: int = 5) -> dict:
    """Wall time of ``fn()`` with ``torch.utils.benchmark.Timer``, median and spread.

    Blocks of calls lasting at least a millisecond each (timer overhead is microseconds),
    at least ``blocks`` of them and at least ``min_run_time`` seconds in all, each a
    ``Timer.timeit`` (which warms up first), merged into one ``Measurement``.
    (``blocked_autorange`` sizes its blocks to keep timer overhead under 1e-4, which on a
    busy machine can leave one block and no spread.) The thread count is the current one.

    Args:
        fn: the call to time.
        min_run_time: seconds of timed calls at least.
        blocks: timed blocks at least.

    Returns:
        ``{"median_ms", "iqr_ms", "blocks", "calls"}``: median and interquartile range per
        call over the blocks, the number of blocks and of timed calls.
    """
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    with torch.no_grad():
        per_call = timer.timeit(1).mean
        number = max(1, math.ceil(1e-3 / max(per_call, 1e-9)))
        runs, elapsed = [], 0.0
        while len(runs) < blocks or elapsed < min_run_time:
            runs.append(timer.timeit(number))
            elapsed += runs[-1].raw_times[0]
        (m,) = benchmark.Measurement.merge(runs)
    count = len(runs)
    return {
        "median_ms": m.median * 1e3,
        "iqr_ms": m.iqr * 1e3,
        "blocks": count,
        "calls": count * number,
    }


def latency_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds: :func:`latency` after ``warmup`` calls,
    about ``repeats`` calls in all (a block of one call costs three: ``Timer.timeit`` warms
    up twice), in at least 5 blocks."""
    for _ in range(warmup):
        fn()
    return latency(fn, min_run_time=0.0, blocks=max(5, repeats // 3))["median_ms"]
