"""From a trained network to checked files: verification of the deployed form and the
registry of the files a deployment writes (:data:`ARTIFACTS`).

:func:`verify_forms` deploys nothing itself: it compares the training and deployed forms in
float64 and in float32 with TF32 off. :func:`write_artifacts` writes every file of
:data:`ARTIFACTS` that its ``formats`` switch asks for, reloads each one, runs it and refuses
it when its output differs from the deployed model in PyTorch by more than its tolerance.
:func:`measure` gives parameters, multiply-accumulates and CPU latency of both forms.
``deploy.py`` (:mod:`repsqueeze.cli.deploy`) is these steps plus the output folder, the
checkpoint and the report.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repsqueeze import export, timing
from repsqueeze.core.numerics import describe_fp32, strict_fp32
from repsqueeze.errors import ConfigError


class DeploymentError(ConfigError):
    """The deployed form or a written file does not match the training form; nothing written."""


@dataclass
class Job:
    """What every artifact writer gets: both forms, the batch to check on, the settings.

    Attributes:
        net: the training form (eval mode).
        deployed: the deployed form (eval mode).
        net_config: the :func:`repsqueeze.create_model` arguments of ``net``.
        x: the batch each written file is run on.
        verification: the errors :func:`verify_forms` found, stored in ``deployed.pt``.
        onnx_opset: the ONNX opset of ``model.onnx``.
        program: ``torch.export`` of ``deployed``, made once for model.pt2 and model.onnx.
    """

    net: nn.Module
    deployed: nn.Module
    net_config: dict
    x: Tensor
    verification: dict
    onnx_opset: int = 18
    program: torch.export.ExportedProgram | None = None

    def exported(self) -> torch.export.ExportedProgram:
        if self.program is None:
            self.program = export.export_program(self.deployed, self.x)
        return self.program


@dataclass(frozen=True)
class Artifact:
    """One file: written by ``write`` (which returns the reloaded file's output on ``job.x``)
    when ``formats[flag]`` is true (always when ``flag`` is ``None``), and refused when that
    output differs from PyTorch by more than ``tol[tolerance]`` (relative)."""

    name: str
    flag: str | None
    write: Callable[[Job, Path], Tensor]
    tolerance: str


def write_deployed_pt(job: Job, path: Path) -> Tensor:
    export.save_deployed(job.deployed, path, job.net_config, {"verification": job.verification})
    return export.load_deployed(path)(job.x)


def write_pt2(job: Job, path: Path) -> Tensor:
    job.program = export.to_pt2(job.deployed, path, job.x)
    return export.load_pt2(path)(job.x)


def write_onnx(job: Job, path: Path) -> Tensor:
    export.to_onnx(job.exported(), path, job.x, opset=job.onnx_opset)
    return export.run_onnx(path, job.x)


def write_torchscript(job: Job, path: Path) -> Tensor:
    export.to_torchscript(job.deployed, path, job.x[:1])
    return torch.jit.load(str(path))(job.x)


# Every file a deployment can write, in order. Another format is one writer ``(job, path) ->
# its reloaded output on job.x`` and one entry here, with its switch under ``formats`` and
# its tolerance under ``tol`` in configs/deploy.yaml; checking, the report and the folder
# swap come with it.
ARTIFACTS = [
    Artifact("deployed.pt", None, write_deployed_pt, "export"),
    Artifact("model.pt2", "pt2", write_pt2, "export"),
    Artifact("model.onnx", "onnx", write_onnx, "onnx"),
    Artifact("model.ts", "torchscript", write_torchscript, "export"),
]
# every file name deploy.py writes: in a folder it did not make, only these are replaced
OWN_FILES = [a.name for a in ARTIFACTS] + ["model.int8.onnx", "report.json"]


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the wall seconds of the ``with`` body to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 3)


@torch.no_grad()
def verify_forms(
    net: nn.Module,
    deployed: nn.Module,
    inputs: Mapping[str, Tensor],
    tol: Mapping[str, float],
    device: str | torch.device = "cpu",
) -> tuple[dict, str]:
    """The largest relative error between both forms on each batch, in float64 and in float32
    with TF32 off (:func:`repsqueeze.export.verify`), computed on ``device``; the models are
    left on the CPU.

    Args:
        net: the training form.
        deployed: its deployed form.
        inputs: named batches.
        tol: ``float32`` and ``float64``, the largest relative errors allowed.
        device: where both forms run.

    Returns:
        ``{batch name: {"float64": error, "float32": error}}`` and a description of the
        float32 numerics (TF32 state) and the device.

    Raises:
        DeploymentError: an error above its tolerance.
    """
    device = torch.device(device)
    with strict_fp32():
        numerics = describe_fp32()
        try:
            errors = export.verify(
                net.to(device), deployed.to(device), dict(inputs), tol["float32"], tol["float64"]
            )
        except ValueError as err:
            raise DeploymentError(f"verification failed, nothing written: {err}") from err
        finally:
            net.cpu()
            deployed.cpu()
    return errors, f"float64 and {numerics}, on {device}"


@torch.no_grad()
def write_artifacts(
    job: Job,
    folder: Path,
    formats: Mapping[str, Any],
    tol: Mapping[str, float],
    timings: dict[str, float],
    artifacts: Sequence[Artifact] | None = None,
) -> dict[str, dict[str, float]]:
    """Writes each artifact ``formats`` asks for into ``folder``, reloads and checks it.

    Args:
        job: both forms and the batch.
        folder: where the files go (a staging folder: a refusal leaves them half written).
        formats: ``{artifact flag: bool}``.
        tol: ``{artifact tolerance: largest relative difference}``.
        timings: receives the seconds each file took, by file name.
        artifacts: the files to consider; :data:`ARTIFACTS` by default.

    Returns:
        ``{file name: {"max_abs_diff": ..., "relative_diff": ...}}``.

    Raises:
        DeploymentError: a reloaded file whose output differs by more than its tolerance.
    """
    reference = job.deployed(job.x)
    scale = float(reference.abs().max().clamp_min(1e-30))
    checks = {}
    for artifact in ARTIFACTS if artifacts is None else artifacts:
        if artifact.flag is not None and not formats[artifact.flag]:
            continue
        with timed(timings, artifact.name):
            output = artifact.write(job, folder / artifact.name)
        diff = export.max_abs_diff(output, reference)
        limit = tol[artifact.tolerance]
        checks[artifact.name] = {"max_abs_diff": diff, "relative_diff": diff / scale}
        if not diff / scale <= limit:
            raise DeploymentError(
                f"{artifact.name}: its output differs from PyTorch by {diff / scale:.2e} "
                f"(relative) > tol.{artifact.tolerance}={limit:.0e}; nothing written"
            )
    return checks


def measure(
    net: nn.Module, deployed: nn.Module, shape: torch.Size, min_run_time: float | None
) -> dict:
    """Parameters and multiply-accumulates of both forms, and their CPU latency at batch 1
    and 32 (:func:`repsqueeze.timing.latency`, ``min_run_time`` seconds each) unless
    ``min_run_time`` is ``None``."""
    out = {}
    for name, model in (("training", net), ("deployed", deployed)):
        x1, x32 = torch.randn(1, *shape), torch.randn(32, *shape)
        out[name] = {
            "params": export.count_params(model),
            "macs_per_sample": export.count_macs(model, x1),
        }
        if min_run_time is not None:
            out[name]["latency_b1"] = timing.latency(lambda m=model, x=x1: m(x), min_run_time)
            out[name]["latency_b32"] = timing.latency(lambda m=model, x=x32: m(x), min_run_time)
    return out
