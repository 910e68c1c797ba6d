"""Verified export of deployed models: state dict, TorchScript, ONNX, and their measurements.

Users of RepVGG, MobileOne and DBB most often report "outputs differ after deploy" and "ONNX
export fails". Everything here checks before it writes: :func:`verify` measures the largest
relative difference between training and deployed forms, :func:`check_onnx` runs the ONNX file
in onnxruntime, and every file is written atomically (a temporary name, then a rename).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

FORMAT = "repsqueeze.deployed/1"


# --- atomic files ----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


# --- deployed.pt -------------------------------------------------------------------------------
def save_deployed(
    model: nn.Module, path: str | Path, arch: dict, extra: dict | None = None
) -> None:
    """Writes ``deployed.pt``: the deployed state dict plus what rebuilds its architecture.

    Args:
        model: a deployed model (see :func:`repsqueeze.deploy`).
        path: file to write.
        arch: keyword arguments of :func:`repsqueeze.models.create_model` (``name`` included)
            that build this model; saved as plain data, so loading runs no pickled code.
        extra: more plain data to store (e.g. verification results).
    """
    payload = {
        "format": FORMAT,
        "arch": dict(arch),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_deployed(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """A ready-to-run model from ``deployed.pt``; the training branches are never built.

    The architecture is rebuilt with ``create_model(..., deployed=True)`` (branches exist
    only on the meta device) and the weights load with ``strict=True``.

    Args:
        path: a file written by :func:`save_deployed`.
        map_location: device for the weights.
    """
    from repsqueeze.models import create_model

    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a repsqueeze deployed model (expected format {FORMAT!r})")
    model = create_model(**{**payload["arch"], "deployed": True})
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(map_location).eval()


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
    report = {}
    for name, x in inputs.items():
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


# --- TorchScript and ONNX --------------------------------------------------------------------
def to_torchscript(model: nn.Module, path: str | Path, example: Tensor) -> None:
    """Traces the (deployed, eval-mode) model and saves it atomically."""
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example)
    with atomic_path(path) as tmp:
        traced.save(str(tmp))


def to_onnx(model: nn.Module, path: str | Path, example: Tensor, opset: int = 18) -> None:
    """Exports to ONNX with a dynamic batch axis, atomically.

    Uses the TorchScript-based exporter (``dynamo=False``): plain convolution networks map
    one to one onto ONNX operators, and it needs nothing beyond ``onnx``.
    """
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(
            model.eval(),
            (example,),
            str(tmp),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )


def run_onnx(path: str | Path, x: Tensor) -> Tensor:
    """Runs an ONNX file in onnxruntime on CPU."""
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

    Convolution and linear modules are counted from their outputs; a block still in
    training form (whose layers run functionally) is counted layer by layer with
    :func:`repsqueeze.blocks.node_macs`, so both forms are measured the same way.
    """
    from repsqueeze.blocks import Squeezable, node_macs

    total = 0.0
    inside_blocks = set()
    for m in model.modules():
        if isinstance(m, Squeezable) and not m.deployed:
            inside_blocks.update(id(c) for c in m.modules() if c is not m)

    def conv_hook(m: nn.Module, _inp: tuple, out: Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)

    def linear_hook(m: nn.Module, _inp: tuple, out: Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    def block_hook(m: nn.Module, inp: tuple, _out: Tensor) -> None:
        nonlocal total
        x = inp[0]
        total += x.shape[0] * node_macs(m, tuple(map(float, x.shape[2:])), x.dim() - 2)[0]

    handles = []
    for m in model.modules():
        if id(m) in inside_blocks:
            continue
        if isinstance(m, Squeezable) and not m.deployed:
            handles.append(m.register_forward_hook(block_hook))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return int(total)


@torch.no_grad()
def latency_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
