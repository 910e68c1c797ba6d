"""Checkpoint in, verified plain model out: deployed.pt, torch.export (.pt2) and ONNX.

    python deploy.py ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt [output_dir=DIR] [data=digits]

1. checks the output folder first, before any work (:mod:`repsqueeze.folders`): it must be
   new, empty, or a folder deploy.py wrote (its marker file says so); a folder holding the
   checkpoint or the current folder is refused, and so is any other folder unless
   ``overwrite=true`` (then only deploy.py's own file names are replaced there); a link is
   followed. It removes the staging folders of killed deploy.py runs beside it, known by
   their marker and dead owner, never by name;
2. loads the Lightning checkpoint with ``torch.load(weights_only=True, map_location="cpu")``
   (no pickled code runs; a GPU checkpoint loads on a CPU-only machine), refuses NaN/Inf
   weights and negative running variances, and rebuilds the network from its ``net_config``;
3. deploys every block (:func:`repsqueeze.deploy`), in eval mode;
4. verifies the largest relative difference between both forms in float64 and float32 with
   TF32 off, on a random batch and on a real batch of the run's data when available;
5. writes every artifact (:data:`ARTIFACTS`: ``deployed.pt``, ``model.pt2``, ``model.onnx``,
   optionally ``model.ts``), each reloaded and checked against PyTorch, plus ``report.json``
   into a staging folder beside the output folder, then swaps the folders: a reader sees
   the previous export or the new one, never a mix, and no file of an older export survives;
6. prints parameters and multiply-accumulates (CPU latency at batch 1 and 32 with
   ``latency=true``), errors, sizes and the seconds each stage took (also in report.json).

Every failure is one line ``deploy.py: error: ...`` and exit status 1; ``HYDRA_FULL_ERROR=1``
shows the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from repsqueeze import export, folders
from repsqueeze.cli import runs  # noqa: F401  (registers ${run_id:} for the run folder)
from repsqueeze.cli.errors import SettingError, full_error, report, run_main
from repsqueeze.cli.schema import validate
from repsqueeze.cli.settings import DEPLOY_SCHEMA, read_checkpoint
from repsqueeze.convert import deploy
from repsqueeze.core.numerics import describe_fp32, strict_fp32
from repsqueeze.folders import Target
from repsqueeze.models import create_model
from repsqueeze.tables import table

OWNER = "deploy.py"


# A problem the user can fix: one line, exit status 1 (the command lines' one error family).
DeployError = SettingError


# --- the output folder -----------------------------------------------------------------------
def output_folder(cfg: DictConfig, ckpt_path: Path) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir).absolute()
    return ckpt_path.resolve().parent.parent / "deployed"


def prepare_output(out_dir: Path, ckpt_path: Path, overwrite: bool) -> tuple[Target, Path]:
    """Checks that ``out_dir`` may receive the export (see :mod:`repsqueeze.folders`), cleans
    up after killed runs, and returns the target and a new staging folder beside it. Runs
    before any other work.

    Raises:
        DeployError: ``out_dir`` (or an ancestor) is a file, holds the checkpoint or the
            current folder, is a folder deploy.py did not write (without ``overwrite``), or
            nothing can be written there.
    """
    protect = [("the checkpoint", ckpt_path), ("the current folder", Path.cwd())]
    try:
        target = folders.check_target(out_dir, OWNER, protect, overwrite)
        return target, folders.stage(target, OWNER)
    except folders.FolderError as err:
        raise DeployError(str(err)) from err


# --- the checkpoint --------------------------------------------------------------------------
def load_checkpoint(
    path: str | Path, notes: list[str] | None = None
) -> tuple[torch.nn.Module, dict]:
    """The training-form network of a ``train.py`` checkpoint and its ``net_config``; a
    checkpoint written with EMA gives its averaged weights (and a line in ``notes``)."""
    path = Path(path)
    ckpt = read_checkpoint(path)  # refuses missing, truncated, unsafe and deployed files
    state, net_config = ckpt["state_dict"], ckpt["hyper_parameters"]["net_config"]
    for key in ("num_classes", "in_channels"):
        value = net_config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DeployError(f"{path}: net_config {key}={value!r}: must be a positive integer")
    # Lightning's WeightAveraging (EMA) callback saves the averaged weights as state_dict
    if notes is not None and "current_model_state" in ckpt and "averaging_state" in ckpt:
        notes.append("trained with weight averaging (EMA): the averaged weights are deployed")
    state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    try:
        export.check_weights(state, str(path))
    except ValueError as err:
        raise DeployError(f"{err}; refusing to deploy it") from err
    try:
        net = create_model(**net_config)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DeployError(f"{path}: cannot rebuild the network from {net_config}: {err}") from err
    problem = export.state_dict_mismatch(net.state_dict(), state)
    if problem:
        raise DeployError(f"{path}: weights do not fit {net_config}: {problem}")
    net.load_state_dict(state, strict=True)
    return net.eval(), dict(net_config)


def data_config(cfg: DictConfig, ckpt_path: Path) -> DictConfig | None:
    """The data module config: given, or the one Hydra saved in the run directory."""
    if cfg.get("data") is not None:
        return cfg.data
    saved = ckpt_path.resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(saved).get("data") if saved.is_file() else None


def input_shape(cfg: DictConfig) -> tuple[int, ...] | None:
    shape = cfg.get("input_shape")
    if shape is None:
        return None
    shape = OmegaConf.to_object(shape) if OmegaConf.is_config(shape) else shape
    if (
        not isinstance(shape, (list, tuple))
        or not shape
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
    ):
        raise DeployError(f"input_shape={shape!r}: give [C,H,W] as positive integers")
    return tuple(shape)


def verification_inputs(
    cfg: DictConfig, ckpt_path: Path, net: torch.nn.Module, notes: list[str]
) -> dict[str, torch.Tensor]:
    """A random batch, plus a real one when the run's data can be loaded."""
    datamodule, shape = None, input_shape(cfg)
    data_cfg = data_config(cfg, ckpt_path) if cfg.use_data or shape is None else None
    if data_cfg is not None:
        try:
            datamodule = instantiate(data_cfg)
        except Exception as err:
            notes.append(f"data module not built: {err}")
    source = "input_shape"
    if shape is None and datamodule is not None:
        shape = (datamodule.in_channels, datamodule.image_size, datamodule.image_size)
        source = "the data module's input shape"
    if shape is None:
        raise DeployError("cannot tell the input shape: give input_shape=[C,H,W]")
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs = {"random": torch.randn(cfg.batch_size, *shape, generator=gen)}
    try:
        with torch.no_grad():
            net(inputs["random"][:2])
    except Exception as err:
        raise DeployError(
            f"{source} {list(shape)} does not fit the network: {str(err).splitlines()[0]}"
        ) from err
    if cfg.use_data and datamodule is None:
        notes.append("no data module found (give data=NAME): verified on the random batch only")
    if cfg.use_data and datamodule is not None:
        from repsqueeze.data import example_batch

        try:
            inputs["data"] = example_batch(datamodule, "test")[0][: cfg.batch_size]
        except Exception as err:
            notes.append(f"no real batch: {type(err).__name__}: {err}")
    return inputs


# --- artifacts -------------------------------------------------------------------------------
@dataclass
class Job:
    """What every artifact writer gets: the config, both forms, a batch and the folder."""

    cfg: DictConfig
    net: torch.nn.Module
    deployed: torch.nn.Module
    net_config: dict
    x: torch.Tensor
    folder: Path
    verification: dict

    @functools.cached_property
    def program(self) -> torch.export.ExportedProgram:
        """The deployed model through ``torch.export`` (shared by model.pt2 and ONNX)."""
        return export.export_program(self.deployed, self.x)


@dataclass(frozen=True)
class Artifact:
    """One file: written by ``write`` (which returns the reloaded file's output on
    ``job.x``) when config key ``flag`` is true (always when ``None``), and refused when
    that output differs from PyTorch by more than config key ``tolerance`` (relative)."""

    name: str
    flag: str | None
    write: Callable[[Job, Path], torch.Tensor]
    tolerance: str


def write_deployed_pt(job: Job, path: Path) -> torch.Tensor:
    export.save_deployed(job.deployed, path, job.net_config, {"verification": job.verification})
    return export.load_deployed(path)(job.x)


def write_pt2(job: Job, path: Path) -> torch.Tensor:
    export.save_atomic(path, lambda f: torch.export.save(job.program, f))
    return export.load_pt2(path)(job.x)


def write_onnx(job: Job, path: Path) -> torch.Tensor:
    export.to_onnx(job.program, path, job.x, opset=job.cfg.onnx_opset)
    return export.run_onnx(path, job.x)


def write_torchscript(job: Job, path: Path) -> torch.Tensor:
    export.to_torchscript(job.deployed, path, job.x[:1])
    return torch.jit.load(str(path))(job.x)


# Every file deploy.py can write, in order. Another format is one writer ``(job, path) ->
# its reloaded output on job.x`` and one entry here, with its on/off and tolerance keys in
# configs/deploy.yaml; writing, checking, the report and the folder swap come with it.
ARTIFACTS = [
    Artifact("deployed.pt", None, write_deployed_pt, "tol_export"),
    Artifact("model.pt2", "pt2", write_pt2, "tol_export"),
    Artifact("model.onnx", "onnx", write_onnx, "tol_onnx"),
    Artifact("model.ts", "torchscript", write_torchscript, "tol_export"),
]
# the files deploy.py writes: with overwrite=true in a folder it did not make, only these
# names are replaced (or deleted when this export has no such file)
OWN_FILES = [a.name for a in ARTIFACTS] + ["model.int8.onnx", "report.json"]


@torch.no_grad()
def build_artifacts(
    cfg: DictConfig, net: torch.nn.Module, net_config: dict, inputs: dict, folder: Path
) -> dict:
    """Deploys, verifies, writes every artifact into ``folder`` and returns the report."""
    timings: dict[str, float] = {}
    with timed(timings, "deploy"):
        deployed = deploy(net).eval()
    device = torch.device(cfg.device)
    with timed(timings, "verify"), strict_fp32():
        numerics = describe_fp32()
        try:
            errors = export.verify(
                net.to(device), deployed.to(device), inputs, cfg.tol_float32, cfg.tol_float64
            )
        except ValueError as err:
            raise DeployError(f"verification failed, nothing written: {err}") from err
        finally:
            net.cpu()
            deployed.cpu()
    x = inputs.get("data", inputs["random"])
    reference = deployed(x)
    scale = float(reference.abs().max().clamp_min(1e-30))
    job = Job(cfg, net, deployed, net_config, x, folder, errors)
    checks = {}
    for artifact in ARTIFACTS:
        if artifact.flag is not None and not cfg[artifact.flag]:
            continue
        with timed(timings, artifact.name):
            output = artifact.write(job, folder / artifact.name)
        diff = export.max_abs_diff(output, reference)
        tol = cfg[artifact.tolerance]
        checks[artifact.name] = {"max_abs_diff": diff, "relative_diff": diff / scale}
        if not diff / scale <= tol:
            raise DeployError(
                f"{artifact.name}: its output differs from PyTorch by {diff / scale:.2e} "
                f"(relative) > {artifact.tolerance}={tol:.0e}; nothing written"
            )
    measurements = None
    if cfg.measure:
        with timed(timings, "measure"):
            latency = cfg.latency_min_run_time if cfg.latency else None
            measurements = measure(net, deployed, x.shape[1:], latency)
    return {
        "net_config": net_config,
        "verification": errors,
        "numerics": f"float64 and {numerics}, on {device}",
        "checks": checks,
        "measurements": measurements,
        "timings_s": timings,
    }


def measure(
    net: torch.nn.Module, deployed: torch.nn.Module, shape: torch.Size, min_run_time: float | None
) -> dict:
    """Parameters and multiply-accumulates of both forms, and their CPU latency at batch 1
    and 32 (``min_run_time`` seconds each) unless ``min_run_time`` is ``None``."""
    out = {}
    for name, model in (("training", net), ("deployed", deployed)):
        x1, x32 = torch.randn(1, *shape), torch.randn(32, *shape)
        out[name] = {
            "params": export.count_params(model),
            "macs_per_sample": export.count_macs(model, x1),
        }
        if min_run_time is not None:
            out[name]["latency_b1"] = export.latency(lambda m=model, x=x1: m(x), min_run_time)
            out[name]["latency_b32"] = export.latency(lambda m=model, x=x32: m(x), min_run_time)
    return out


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the wall seconds of the ``with`` body to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - start, 3)


def run(cfg: DictConfig) -> dict:
    """The whole deploy step; returns the report. Raises :class:`DeployError`."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise DeployError("give the checkpoint: python deploy.py ckpt_path=PATH")
    validate(cfg, DEPLOY_SCHEMA)  # every setting, before any work
    started = time.perf_counter()
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():  # before the default output folder beside it is made
        raise DeployError(f"checkpoint not found: {ckpt_path}")
    out_dir = output_folder(cfg, ckpt_path)
    timings: dict[str, float] = {}
    with timed(timings, "output folder"):
        target, staging = prepare_output(out_dir, ckpt_path, bool(cfg.get("overwrite")))
    threads = torch.get_num_threads()  # put back after: run() may be called in-process
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    try:
        if cfg.onnx:
            try:
                export.require_onnx()
            except ImportError as err:
                raise DeployError(export.ONNX_HINT) from err
        torch.manual_seed(cfg.seed)
        notes: list[str] = []
        with timed(timings, "load"):
            net, net_config = load_checkpoint(ckpt_path, notes)
        if not export.has_blocks(net):
            notes.append("nothing to squeeze: the network has no re-parameterizable block")
        with timed(timings, "inputs"):
            inputs = verification_inputs(cfg, ckpt_path, net, notes)
        report = build_artifacts(cfg, net, net_config, inputs, staging)
        report["timings_s"] = {**timings, **report["timings_s"]}
        if cfg.get("int8"):
            with timed(report["timings_s"], "int8"):
                report.update(int8_artifact(cfg, net, ckpt_path, staging))
        report["notes"] = notes
        report["checkpoint"] = str(ckpt_path)
        report["files"] = {
            p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.name != folders.MARKER
        }
        report["timings_s"]["total"] = round(time.perf_counter() - started, 3)
        report["threads"] = torch.get_num_threads()
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        folders.publish(staging, target, OWNER, OWN_FILES)
    except folders.FolderError as err:
        raise DeployError(str(err)) from err
    finally:
        folders.discard(staging, OWNER)
        torch.set_num_threads(threads)
    report["output_dir"] = str(out_dir)
    print_report(report)
    return report


def int8_artifact(cfg: DictConfig, net: torch.nn.Module, ckpt_path: Path, folder: Path) -> dict:
    """``model.int8.onnx`` in ``folder`` (see :func:`repsqueeze.quant.quantize`): calibrated on
    ``int8_calibration_batches`` training batches, checked on the test split; its report."""
    from itertools import islice

    from repsqueeze import quant

    data_cfg = data_config(cfg, ckpt_path)
    if data_cfg is None:
        raise DeployError("int8=true needs the run's data (give data=NAME) to calibrate and test")
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    calibration = islice(datamodule.train_dataloader(), cfg.int8_calibration_batches)
    try:
        report = quant.quantize(
            deploy(net).eval(), calibration, datamodule.test_dataloader(),
            folder / "model.int8.onnx", max_drop=cfg.int8_max_drop, cle=cfg.int8_cle,
            method=cfg.int8_calibration_method, opset=cfg.onnx_opset,
        )  # fmt: skip
    except ValueError as err:  # QuantizationError included: one line, nothing written
        raise DeployError(str(err)) from err
    print("\n".join(quant.summary(report)))
    return report


def print_report(report: dict) -> None:
    lines = []
    if report["measurements"]:
        m = report["measurements"]
        forms = ("training", "deployed")

        def ms(key: str, form: str) -> str:
            t = m[form][key]
            return f"{t['median_ms']:.3f} ms (IQR {t['iqr_ms']:.3f})"

        rows = [
            ("parameters", *(m[k]["params"] for k in forms)),
            ("MACs / sample", *(m[k]["macs_per_sample"] for k in forms)),
        ]
        if "latency_b1" in m["training"]:
            threads = f"{report['threads']} thread{'s' if report['threads'] > 1 else ''}"
            rows += [
                (f"CPU latency, batch 1 ({threads})", *(ms("latency_b1", k) for k in forms)),
                (f"CPU latency, batch 32 ({threads})", *(ms("latency_b32", k) for k in forms)),
            ]
        lines += [table(rows, ["", "training form", "deployed"], markdown=False)]
        if "latency_b1" not in m["training"]:
            lines += ["CPU latency: not measured (latency=true measures it)"]
        lines += [""]
    errors = [(name, e["float64"], e["float32"]) for name, e in report["verification"].items()]
    files = [
        (n, f"{size / 1024:.1f} KiB", report["checks"].get(n, {}).get("relative_diff"))
        for n, size in report["files"].items()
    ]
    lines += [
        f"max relative error, deployed vs training form ({report['numerics']}):",
        table(errors, ["input", "float64", "float32"], markdown=False),
        "",
        table(files, ["file", "size", "rel. diff vs PyTorch"], markdown=False),
        *(f"note: {n}" for n in report["notes"]),
        "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["timings_s"].items()),
        f"written to {report['output_dir']}",
    ]
    print("\n".join(lines))


def entry(cfg: DictConfig) -> int:
    """:func:`run` as the command line sees it: the exit status; a failure is one line on
    stderr (the traceback propagates when ``HYDRA_FULL_ERROR=1``)."""
    try:
        run(cfg)
    except Exception as err:
        if full_error():
            raise
        return report("deploy.py", err, "output_dir")
    return 0


@hydra.main(version_base="1.3", config_path="configs", config_name="deploy")
def main(cfg: DictConfig) -> None:
    status = entry(cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    run_main(main, "deploy.py", "output_dir")
