"""``python deploy.py``: a checkpoint in, a verified plain model out (``deployed.pt``,
``model.pt2``, ``model.onnx``, optionally ``model.ts`` and ``model.int8.onnx``).

    python deploy.py ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt [output_dir=DIR] [data=digits]

1. checks the output folder first, before any work (:mod:`repsqueeze.files`): it must be
   new, empty, or a folder deploy.py wrote (its marker file says so); a folder holding the
   checkpoint or the current folder is refused, and so is any other folder unless
   ``overwrite=true`` (then only deploy.py's own file names are replaced there); a link is
   followed. It removes the staging folders of killed deploy.py runs beside it, known by
   their marker and dead owner, never by name;
2. loads the checkpoint safely (:mod:`repsqueeze.checkpoints`: tensors and plain data only,
   onto the CPU) and rebuilds the network from its ``net_config``;
3. deploys every block (:func:`repsqueeze.deploy`), in eval mode;
4. verifies both forms in float64 and in float32 with TF32 off, on a random batch and on a
   real batch of the run's data when available (:func:`repsqueeze.artifacts.verify_forms`);
5. writes every artifact (:data:`repsqueeze.artifacts.ARTIFACTS`), each reloaded and checked
   against PyTorch, plus ``report.json`` into a staging folder beside the output folder, then
   swaps the folders: a reader sees the previous export or the new one, never a mix;
6. prints parameters and multiply-accumulates (CPU latency at batch 1 and 32 with
   ``measure.latency=true``), errors, sizes and the seconds each stage took (also in
   report.json).

Every failure is one line ``deploy.py: error: ...`` and exit status 1; ``HYDRA_FULL_ERROR=1``
shows the traceback. The settings are in ``configs/deploy.yaml`` (see docs/deploy.md).
"""

from __future__ import annotations

import json
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from repsqueeze import artifacts, checkpoints, export, files
from repsqueeze.artifacts import timed
from repsqueeze.cli import runs  # noqa: F401  (registers ${run_id:} for the run folder)
from repsqueeze.cli.errors import SettingError, full_error, report, run_main
from repsqueeze.cli.schema import validate
from repsqueeze.cli.settings import DEPLOY_SCHEMA, moved_deploy_setting
from repsqueeze.files import Target
from repsqueeze.surgery import deploy
from repsqueeze.tables import table

PROG = OWNER = "deploy.py"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# A problem the user can fix: one line, exit status 1 (the command lines' one error family).
DeployError = SettingError


# --- the output folder -----------------------------------------------------------------------
def output_folder(cfg: DictConfig, ckpt_path: Path) -> Path:
    """``output_dir``, or ``deployed/`` in the checkpoint's run folder."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir).absolute()
    return ckpt_path.resolve().parent.parent / "deployed"


def prepare_output(out_dir: Path, ckpt_path: Path, overwrite: bool) -> tuple[Target, Path]:
    """Checks that ``out_dir`` may receive the export (see :mod:`repsqueeze.files`), cleans
    up after killed runs, and returns the target and a new staging folder beside it.

    Raises:
        DeployError: ``out_dir`` (or an ancestor) is a file, holds the checkpoint or the
            current folder, is a folder deploy.py did not write (without ``overwrite``), or
            nothing can be written there.
    """
    protect = [("the checkpoint", ckpt_path), ("the current folder", Path.cwd())]
    try:
        target = files.check_target(out_dir, OWNER, protect, overwrite)
        return target, files.stage(target, OWNER)
    except files.FolderError as err:
        raise DeployError(str(err)) from err


# --- the checkpoint and the verification batches ---------------------------------------------
def load_checkpoint(path: Path, notes: list[str]) -> tuple[torch.nn.Module, dict]:
    """The training-form network of a checkpoint and its ``net_config``; a checkpoint written
    with weight averaging gives its averaged weights (and a line in ``notes``)."""
    try:
        ckpt = checkpoints.read_checkpoint(path)
        net = checkpoints.load_network(ckpt)
    except checkpoints.CheckpointError as err:
        raise DeployError(str(err)) from err
    if ckpt.averaged:
        notes.append("trained with weight averaging (EMA): the averaged weights are deployed")
    return net, ckpt.net_config


def data_config(cfg: DictConfig, ckpt_path: Path) -> DictConfig | None:
    """The data module config: given, or the one Hydra saved in the run directory."""
    if cfg.get("data") is not None:
        return cfg.data
    saved = ckpt_path.resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(saved).get("data") if saved.is_file() else None


def build_data(data_cfg: DictConfig) -> Any:
    """The data of ``data_cfg``: for a data module repsqueeze ships, its Lightning-free class
    (:data:`repsqueeze.training.data.PLAIN_DATA`, same arguments, no Lightning import);
    for any other target, the target itself."""
    from repsqueeze.training.data import PLAIN_DATA

    plain = PLAIN_DATA.get(data_cfg.get("_target_"))
    if plain is None:
        return instantiate(data_cfg)
    return instantiate(data_cfg, _target_=f"{plain.__module__}.{plain.__qualname__}")


def verification_inputs(
    cfg: DictConfig, ckpt_path: Path, net: torch.nn.Module, notes: list[str]
) -> dict[str, torch.Tensor]:
    """A random batch, plus a real one when the run's data can be loaded."""
    shape = tuple(cfg.input_shape) if cfg.input_shape is not None else None
    datamodule = None
    data_cfg = data_config(cfg, ckpt_path) if cfg.use_data or shape is None else None
    if data_cfg is not None:
        try:
            datamodule = build_data(data_cfg)
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
        from repsqueeze.training.data import example_batch  # the data, only when used

        try:
            inputs["data"] = example_batch(datamodule, "test")[0][: cfg.batch_size]
        except Exception as err:
            notes.append(f"no real batch: {type(err).__name__}: {err}")
    return inputs


# --- the files -------------------------------------------------------------------------------
def build_artifacts(
    cfg: DictConfig,
    net: torch.nn.Module,
    deployed: torch.nn.Module,
    net_config: dict,
    inputs: dict,
    folder: Path,
) -> dict:
    """Verifies ``deployed`` against ``net``, writes every artifact into ``folder`` and
    returns the report."""
    timings: dict[str, float] = {}
    with timed(timings, "verify"):
        errors, numerics = artifacts.verify_forms(net, deployed, inputs, cfg.tol, cfg.device)
    x = inputs.get("data", inputs["random"])
    job = artifacts.Job(net, deployed, net_config, x, errors, cfg.formats.onnx_opset)
    checks = artifacts.write_artifacts(job, folder, cfg.formats, cfg.tol, timings)
    measurements = None
    if cfg.measure.enabled:
        with timed(timings, "measure"):
            latency = cfg.measure.min_run_time if cfg.measure.latency else None
            measurements = artifacts.measure(net, deployed, x.shape[1:], latency)
    return {
        "net_config": net_config,
        "verification": errors,
        "numerics": numerics,
        "checks": checks,
        "measurements": measurements,
        "timings_s": timings,
    }


def int8_artifact(
    cfg: DictConfig, deployed: torch.nn.Module, ckpt_path: Path, folder: Path
) -> dict:
    """``model.int8.onnx`` of the deployed network in ``folder`` (see
    :func:`repsqueeze.quant.quantize`): calibrated on ``int8.calibration_batches`` training
    batches, checked on the test split; its report."""
    from repsqueeze import quant  # onnxruntime's quantization, only when asked

    data_cfg = data_config(cfg, ckpt_path)
    if data_cfg is None:
        raise DeployError(
            "int8.enabled=true needs the run's data (give data=NAME) to calibrate and test"
        )
    datamodule = build_data(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    calibration = islice(datamodule.train_dataloader(), cfg.int8.calibration_batches)
    try:
        result = quant.quantize(
            deployed, calibration, datamodule.test_dataloader(),
            folder / "model.int8.onnx", max_drop=cfg.int8.max_drop, cle=cfg.int8.cle,
            method=cfg.int8.calibration_method, opset=cfg.formats.onnx_opset,
        )  # fmt: skip
    except ValueError as err:  # QuantizationError included: one line, nothing written
        raise DeployError(str(err)) from err
    print("\n".join(quant.summary(result)))
    return result


# --- the whole step --------------------------------------------------------------------------
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
        result = _deploy_into(cfg, ckpt_path, staging, timings)
        result["timings_s"]["total"] = round(time.perf_counter() - started, 3)
        (staging / "report.json").write_text(json.dumps(result, indent=2))
        files.publish(staging, target, OWNER, artifacts.OWN_FILES)
    except files.FolderError as err:
        raise DeployError(str(err)) from err
    finally:
        files.discard(staging, OWNER)
        torch.set_num_threads(threads)
    result["output_dir"] = str(out_dir)
    print_report(result)
    return result


def _deploy_into(cfg: DictConfig, ckpt_path: Path, staging: Path, timings: dict) -> dict:
    """Everything between the output folder check and the folder swap; the report."""
    if cfg.formats.onnx:
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
    with timed(timings, "deploy"):
        deployed = deploy(net).eval()
    try:
        result = build_artifacts(cfg, net, deployed, net_config, inputs, staging)
    except artifacts.DeploymentError as err:
        raise DeployError(str(err)) from err
    result["timings_s"] = {**timings, **result["timings_s"]}
    if cfg.int8.enabled:
        with timed(result["timings_s"], "int8"):
            result.update(int8_artifact(cfg, deployed, ckpt_path, staging))
    result["notes"] = notes
    result["checkpoint"] = str(ckpt_path)
    result["files"] = {
        p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.name != files.MARKER
    }
    result["threads"] = torch.get_num_threads()
    return result


# --- the report ------------------------------------------------------------------------------
def _measurement_lines(result: dict) -> list[str]:
    m = result["measurements"]
    if not m:
        return []
    forms = ("training", "deployed")

    def ms(key: str, form: str) -> str:
        t = m[form][key]
        return f"{t['median_ms']:.3f} ms (IQR {t['iqr_ms']:.3f})"

    rows = [
        ("parameters", *(m[k]["params"] for k in forms)),
        ("MACs / sample", *(m[k]["macs_per_sample"] for k in forms)),
    ]
    timed_latency = "latency_b1" in m["training"]
    if timed_latency:
        threads = f"{result['threads']} thread{'s' if result['threads'] > 1 else ''}"
        rows += [
            (f"CPU latency, batch 1 ({threads})", *(ms("latency_b1", k) for k in forms)),
            (f"CPU latency, batch 32 ({threads})", *(ms("latency_b32", k) for k in forms)),
        ]
    lines = [table(rows, ["", "training form", "deployed"], markdown=False)]
    if not timed_latency:
        lines += ["CPU latency: not measured (measure.latency=true measures it)"]
    return [*lines, ""]


def print_report(result: dict) -> None:
    """The report as tables on stdout."""
    errors = [(name, e["float64"], e["float32"]) for name, e in result["verification"].items()]
    files = [
        (n, f"{size / 1024:.1f} KiB", result["checks"].get(n, {}).get("relative_diff"))
        for n, size in result["files"].items()
    ]
    lines = [
        *_measurement_lines(result),
        f"max relative error, deployed vs training form ({result['numerics']}):",
        table(errors, ["input", "float64", "float32"], markdown=False),
        "",
        table(files, ["file", "size", "rel. diff vs PyTorch"], markdown=False),
        *(f"note: {n}" for n in result["notes"]),
        "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in result["timings_s"].items()),
        f"written to {result['output_dir']}",
    ]
    print("\n".join(lines))


# --- the command line ------------------------------------------------------------------------
def entry(cfg: DictConfig) -> int:
    """:func:`run` as the command line sees it: the exit status; a failure is one line on
    stderr (the traceback propagates when ``HYDRA_FULL_ERROR=1``)."""
    try:
        run(cfg)
    except Exception as err:
        if full_error():
            raise
        return report(PROG, err, "output_dir")
    return 0


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="deploy")
def _hydra_main(cfg: DictConfig) -> None:
    status = entry(cfg)
    if status:
        sys.exit(status)


def main() -> None:
    """``python deploy.py [overrides]``: a flat name of a grouped setting (``tol_float32=``)
    is refused in one line before Hydra composes the config."""
    for override in sys.argv[1:]:
        refusal = moved_deploy_setting(override)
        if refusal is not None:
            sys.exit(report(PROG, refusal, "output_dir"))
    run_main(_hydra_main, PROG, "output_dir")
