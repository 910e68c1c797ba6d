"""Exported formats of a deployed model: ``torch.export`` (``model.pt2``), ONNX (run in
onnxruntime) and TorchScript; every file is written atomically."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from repsqueeze.files import atomic_path, save_atomic

ONNX_MODULES = ("onnx", "onnxruntime", "onnxscript")
ONNX_HINT = (
    "ONNX export needs onnx, onnxruntime and onnxscript: pip install 'repsqueeze[export]', "
    "or formats.onnx=false"
)


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


def to_pt2(
    model: nn.Module | torch.export.ExportedProgram, path: str | Path, example: Tensor
) -> torch.export.ExportedProgram:
    """Writes ``model.pt2`` (:func:`export_program` saved with ``torch.export.save``)
    atomically; reload it with ``torch.export.load(path).module()``.

    Args:
        model: the deployed model, or its :func:`export_program` (then it is saved as it is).
        path: file to write.
        example: an input batch (unused when ``model`` is a program).

    Returns:
        The exported program, to hand on to :func:`to_onnx` without exporting twice.
    """
    program = model if isinstance(model, torch.export.ExportedProgram) else None
    program = program or export_program(model, example)
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


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime ``InferenceSession`` of an ONNX file on CPU.

    Args:
        path: the ONNX file.
        threads: intra-op threads; ``None`` leaves onnxruntime's default.
    """
    require_onnx()
    import onnxruntime as ort  # optional dependency (the export extra)

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, x: Tensor) -> Tensor:
    """Runs an ONNX file in onnxruntime on CPU."""
    session = onnx_session(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().float().numpy()})
    return torch.from_numpy(out)
