"""Checkpoint in, verified plain model out: PyTorch, TorchScript and ONNX.

    python deploy.py ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt [output_dir=DIR] [data=digits]

1. loads the Lightning checkpoint with ``torch.load(weights_only=True)`` (no pickled code
   runs) and rebuilds the network from the ``net_config`` stored in it;
2. deploys every block (:func:`repsqueeze.deploy`), in eval mode;
3. verifies the largest relative difference between both forms in float64 and float32, on a
   random batch and on a real batch of the run's data when available; refuses to write
   anything if a tolerance is exceeded;
4. writes ``deployed.pt``, ``model.ts``, ``model.onnx`` (checked in onnxruntime) and
   ``report.json`` into the output folder, all or nothing;
5. prints parameters, multiply-accumulates, CPU latency (batch 1 and 32), the errors and
   the file sizes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from repsqueeze import export
from repsqueeze.convert import deploy
from repsqueeze.models import create_model


class DeployError(Exception):
    """A problem the user can fix; reported as one line, exit status 1."""


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The training-form network of a ``train.py`` checkpoint and its ``net_config``."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DeployError(
            f"{path}: cannot be loaded safely (weights_only): not a PyTorch checkpoint, or it "
            "holds pickled Python objects, which are never run here"
        ) from err
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise DeployError(
            f"{path}: not a readable PyTorch checkpoint ({type(err).__name__})"
        ) from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise DeployError(f"{path}: not a Lightning checkpoint (no state_dict)")
    net_config = hparams.get("net_config") if isinstance(hparams, dict) else None
    if not isinstance(net_config, dict):
        raise DeployError(
            f"{path}: no net_config in its hyper-parameters; was it written by train.py?"
        )
    try:
        net = create_model(**net_config)
    except (TypeError, ValueError) as err:
        raise DeployError(f"{path}: cannot rebuild the network from {net_config}: {err}") from err
    state = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DeployError(
            f"{path}: weights do not fit {net_config}: {str(err).splitlines()[0]}"
        ) from err
    return net.eval(), dict(net_config)


def data_config(cfg: DictConfig, ckpt_path: Path) -> DictConfig | None:
    """The data module config: given, or the one Hydra saved in the run directory."""
    if cfg.get("data") is not None:
        return cfg.data
    saved = ckpt_path.resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(saved).get("data") if saved.is_file() else None


def verification_inputs(
    cfg: DictConfig, ckpt_path: Path, notes: list[str]
) -> dict[str, torch.Tensor]:
    """A random batch, plus a real one when the run's data can be loaded."""
    datamodule, shape = None, cfg.get("input_shape")
    data_cfg = data_config(cfg, ckpt_path) if cfg.use_data or shape is None else None
    if data_cfg is not None:
        try:
            datamodule = instantiate(data_cfg)
        except Exception as err:
            notes.append(f"data module not built: {err}")
    if shape is None and datamodule is not None:
        shape = (datamodule.in_channels, datamodule.image_size, datamodule.image_size)
    if shape is None:
        raise DeployError("cannot tell the input shape: give input_shape=[C,H,W]")
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs = {"random": torch.randn(cfg.batch_size, *shape, generator=gen)}
    if cfg.use_data and datamodule is None:
        notes.append("no data module found (give data=NAME): verified on the random batch only")
    if cfg.use_data and datamodule is not None:
        from repsqueeze.data import example_batch

        try:
            inputs["data"] = example_batch(datamodule, "test")[0][: cfg.batch_size]
        except Exception as err:
            notes.append(f"no real batch: {type(err).__name__}: {err}")
    return inputs


@torch.no_grad()
def build_artifacts(
    cfg: DictConfig, net: torch.nn.Module, net_config: dict, inputs: dict, folder: Path
) -> dict:
    """Deploys, verifies, writes every artifact into ``folder`` and returns the report."""
    deployed = deploy(net).eval()
    try:
        errors = export.verify(net, deployed, inputs, tol32=cfg.tol_float32, tol64=cfg.tol_float64)
    except ValueError as err:
        raise DeployError(f"verification failed, nothing written: {err}") from err
    x = inputs.get("data", inputs["random"])
    report: dict[str, Any] = {"net_config": net_config, "verification": errors, "files": {}}
    export.save_deployed(
        deployed, folder / "deployed.pt", net_config, extra={"verification": errors}
    )
    reloaded = export.load_deployed(folder / "deployed.pt")
    report["reload_max_abs_diff"] = export.max_abs_diff(reloaded(x), deployed(x))
    if cfg.torchscript:
        export.to_torchscript(deployed, folder / "model.ts", x[:1])
        ts = torch.jit.load(str(folder / "model.ts"))
        report["torchscript_max_abs_diff"] = export.max_abs_diff(ts(x), deployed(x))
    if cfg.onnx:
        export.to_onnx(deployed, folder / "model.onnx", x[:1], opset=cfg.onnx_opset)
        with torch.no_grad():
            ref = deployed(x)
        diff = export.max_abs_diff(export.run_onnx(folder / "model.onnx", x), ref)
        report["onnx_max_abs_diff"] = diff
        report["onnx_relative_diff"] = diff / float(ref.abs().max().clamp_min(1e-30))
        if not report["onnx_relative_diff"] <= cfg.tol_onnx:
            raise DeployError(
                f"onnxruntime output differs from PyTorch by {report['onnx_relative_diff']:.2e} "
                f"(relative) > {cfg.tol_onnx:.0e}; nothing written"
            )
    report["measurements"] = measure(net, deployed, x[:1].shape[1:], cfg.latency_repeats)
    return report


def measure(
    net: torch.nn.Module, deployed: torch.nn.Module, shape: torch.Size, repeats: int
) -> dict:
    out = {}
    for name, model in (("training", net), ("deployed", deployed)):
        x1, x32 = torch.randn(1, *shape), torch.randn(32, *shape)
        out[name] = {
            "params": export.count_params(model),
            "macs_per_sample": export.count_macs(model, x1),
            "latency_ms_b1": export.latency_ms(lambda m=model, x=x1: m(x), repeats),
            "latency_ms_b32": export.latency_ms(lambda m=model, x=x32: m(x), max(3, repeats // 4)),
        }
    return out


def run(cfg: DictConfig) -> dict:
    """The whole deploy step; returns the report. Raises :class:`DeployError`."""
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise DeployError("give the checkpoint: python deploy.py ckpt_path=PATH")
    torch.manual_seed(cfg.seed)
    ckpt_path = Path(cfg.ckpt_path)
    net, net_config = load_checkpoint(ckpt_path)
    notes: list[str] = []
    inputs = verification_inputs(cfg, ckpt_path, notes)
    out_dir = (
        Path(cfg.output_dir)
        if cfg.get("output_dir")
        else ckpt_path.resolve().parent.parent / "deployed"
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".deploy-", dir=out_dir.parent))
    try:
        report = build_artifacts(cfg, net, net_config, inputs, staging)
        if cfg.get("int8"):
            report.update(int8_artifact(cfg, net, ckpt_path, staging))
        report["notes"] = notes
        report["checkpoint"] = str(ckpt_path)
        names = [p.name for p in staging.iterdir()] + ["report.json"]
        report["files"] = {n: (staging / n).stat().st_size for n in names if (staging / n).exists()}
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:  # every artifact is complete before the first one is moved in
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report["output_dir"] = str(out_dir)
    print_table(report)
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
            latency_repeats=cfg.latency_repeats,
        )  # fmt: skip
    except ValueError as err:  # QuantizationError included: one line, nothing written
        raise DeployError(str(err)) from err
    print("\n".join(quant.summary(report)))
    return report


def print_table(report: dict) -> None:
    m = report["measurements"]
    rows = [
        ("parameters", *(f"{m[k]['params']:,}" for k in ("training", "deployed"))),
        ("MACs / sample", *(f"{m[k]['macs_per_sample']:,}" for k in ("training", "deployed"))),
        (
            "CPU latency, batch 1",
            *(f"{m[k]['latency_ms_b1']:.3f} ms" for k in ("training", "deployed")),
        ),
        (
            "CPU latency, batch 32",
            *(f"{m[k]['latency_ms_b32']:.3f} ms" for k in ("training", "deployed")),
        ),
    ]
    lines = [f"{'':<26}{'training form':>16}{'deployed':>16}", "-" * 58]
    lines += [f"{a:<26}{b:>16}{c:>16}" for a, b, c in rows]
    lines.append("")
    for name, errs in report["verification"].items():
        lines.append(
            f"max relative error, {name} input: float64 {errs['float64']:.2e}, float32 {errs['float32']:.2e}"
        )
    for key in ("torchscript_max_abs_diff", "onnx_max_abs_diff"):
        if key in report:
            lines.append(f"{key.replace('_', ' ')} vs PyTorch: {report[key]:.2e}")
    lines += [f"{n:<14}{size / 1024:>10.1f} KiB" for n, size in report["files"].items()]
    lines += [f"note: {n}" for n in report["notes"]]
    lines.append(f"written to {report['output_dir']}")
    print("\n".join(lines))


@hydra.main(version_base="1.3", config_path="configs", config_name="deploy")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except DeployError as err:
        print(f"deploy.py: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
