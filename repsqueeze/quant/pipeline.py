"""INT8 deployment of a deployed (plain) model, verified: export to ONNX, quantize in
onnxruntime (QDQ, symmetric per-channel INT8 weights, INT8 activations calibrated on real
batches), measure float and INT8 accuracy and latency, and write the INT8 file only when the
accuracy drop is within a limit.

References:
    Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repsqueeze import export
from repsqueeze.quant.calibration import as_numpy, quantize_onnx
from repsqueeze.quant.equalization import equalize
from repsqueeze.quant.ranges import weight_ranges, worst_layers
from repsqueeze.quant.runtime import onnx_accuracy, onnx_latency_ms

FORMAT = "ONNX QDQ: symmetric per-channel INT8 weights, INT8 activations (static, calibrated)"


class QuantizationError(ValueError):
    """The INT8 model loses more accuracy than allowed; nothing was written."""


def _first_input(data: Iterable) -> Tensor:
    for batch in data:
        return torch.from_numpy(as_numpy(batch))
    raise ValueError("no test batches: the INT8 model is checked on the test split")


def quantize(
    model: nn.Module,
    calibration: Iterable[Tensor],
    test: Iterable[tuple[Tensor, Tensor]],
    path: str | Path,
    max_drop: float = 0.02,
    cle: bool = False,
    method: str = "minmax",
    opset: int = 18,
    latency_repeats: int = 20,
    latency_threads: int = 1,
    worst: int = 3,
) -> dict[str, Any]:
    """INT8 model of a deployed classifier, verified on test data, written to ``path``.

    Exports ``model`` (equalized first with ``cle``) to ONNX, quantizes it with
    :func:`quantize_onnx`, measures top-1 accuracy of the float and the INT8 ONNX models
    on ``test`` and their onnxruntime CPU latency at batch 1 and 32, and writes the INT8
    file (atomically) only when ``acc_float - acc_int8 <= max_drop``.

    Args:
        model: the deployed float model (``repsqueeze.deploy(...)``), eval mode.
        calibration: input batches for the activation ranges (from the training split).
        test: ``(x, y)`` batches of the test split, iterable twice (a ``DataLoader`` or a
            list): once for the example input, once for both models' accuracy.
        path: the INT8 ONNX file to write (e.g. ``model.int8.onnx``).
        max_drop: largest accepted accuracy drop (a fraction: 0.02 is 2 points).
        cle: apply :func:`equalize` before quantizing.
        method: activation calibration (see :func:`quantize_onnx`).
        opset: ONNX opset of the export.
        latency_repeats: timed runs per model and batch size.
        latency_threads: onnxruntime intra-op threads while timing.
        worst: how many layers to name in ``int8_worst_layers``.

    Returns:
        The report: ``acc_float``, ``acc_int8``, ``int8_acc_drop``, ``int8_max_drop``,
        ``int8_latency_ms`` (``{float,int8}_b{1,32}``), ``int8_weight_ranges`` (per conv;
        ``range_ratio_cle`` with ``cle``), ``int8_worst_layers``, ``int8_cle_pairs``,
        ``int8_calibration_{batches,method}``, ``int8_test_samples``, ``int8_format``,
        ``int8_bytes``.

    Raises:
        QuantizationError: the drop is above ``max_drop``; nothing is written.
    """
    if not max_drop >= 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    example, path = _first_input(test)[:1], Path(path)
    model, ranges, pairs = _prepared(model, cle)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        models = {"float": Path(tmp) / "float.onnx", "int8": Path(tmp) / "int8.onnx"}
        export.to_onnx(model, models["float"], example, opset=opset)
        n_batches = quantize_onnx(models["float"], models["int8"], calibration, method)
        accuracy, n_test = onnx_accuracy(models, test)
        report = _report(accuracy, models["int8"], ranges, pairs, cle, worst)
        latency = _latencies(models, example, latency_repeats, latency_threads)
        report.update(int8_max_drop=max_drop, int8_latency_ms=latency, int8_test_samples=n_test)
        report.update(int8_calibration_batches=n_batches, int8_calibration_method=method)
        _check_drop(report, path)
        os.replace(models["int8"], path)
    return report


def _report(
    accuracy: dict[str, float],
    int8_path: Path,
    ranges: list[dict[str, Any]],
    pairs: list[tuple[str, str]],
    cle: bool,
    worst: int,
) -> dict[str, Any]:
    """The accuracy, weight-range and file parts of a :func:`quantize` report."""
    key = "range_ratio_cle" if cle else "range_ratio"
    return {
        "acc_float": accuracy["float"],
        "acc_int8": accuracy["int8"],
        "int8_acc_drop": accuracy["float"] - accuracy["int8"],
        "int8_weight_ranges": ranges,
        "int8_worst_layers": [
            {"layer": r["layer"], "range_ratio": r[key]} for r in worst_layers(ranges, worst, key)
        ],
        "int8_cle_pairs": [list(p) for p in pairs],
        "int8_format": FORMAT,
        "int8_bytes": int8_path.stat().st_size,
    }


def _prepared(
    model: nn.Module, cle: bool
) -> tuple[nn.Module, list[dict[str, Any]], list[tuple[str, str]]]:
    """A float eval-mode copy of ``model`` (equalized with ``cle``), its weight ranges (with
    ``range_ratio_cle`` after equalization) and the equalized pairs."""
    model = copy.deepcopy(model).float().eval()
    ranges = weight_ranges(model)
    pairs: list[tuple[str, str]] = []
    if cle:
        model, pairs = equalize(model, inplace=True)
        for row, after in zip(ranges, weight_ranges(model), strict=True):
            row["range_ratio_cle"] = after["range_ratio"]
    return model, ranges, pairs


def _latencies(
    models: dict[str, Path], example: Tensor, repeats: int, threads: int
) -> dict[str, float]:
    """``{float,int8}_b{1,32}``: onnxruntime CPU latency (ms) at batch 1 and 32."""
    latency = {}
    for batch in (1, 32):
        shape = (batch, *example.shape[1:])
        for k, ms in onnx_latency_ms(models, shape, repeats, threads).items():
            latency[f"{k}_b{batch}"] = ms
    return latency


def _check_drop(report: dict[str, Any], path: Path) -> None:
    """Raises :class:`QuantizationError` when the accuracy drop is above the limit."""
    drop, limit = report["int8_acc_drop"], report["int8_max_drop"]
    if drop <= limit:
        return
    worst = report["int8_worst_layers"][:1]
    hint = "".join(
        f"; worst weight range ratio {r['range_ratio']:.1f} in {r['layer']}" for r in worst
    )
    raise QuantizationError(
        f"INT8 accuracy drop {drop:.4f} above int8.max_drop={limit} (float "
        f"{report['acc_float']:.4f}, int8 {report['acc_int8']:.4f}){hint}; {path.name} not "
        "written (try cross-layer equalization or more calibration batches)"
    )


def summary(report: dict[str, Any]) -> list[str]:
    """Printable lines of a :func:`quantize` report."""
    lat = report["int8_latency_ms"]
    lines = [
        f"INT8 ({report['int8_format']}): test accuracy float {report['acc_float']:.4f}, "
        f"int8 {report['acc_int8']:.4f}, drop {report['int8_acc_drop']:+.4f} "
        f"(limit {report['int8_max_drop']}); {report['int8_calibration_batches']} "
        "calibration batches",
        f"onnxruntime CPU latency float / int8: batch 1 {lat['float_b1']:.3f} / "
        f"{lat['int8_b1']:.3f} ms, batch 32 {lat['float_b32']:.3f} / {lat['int8_b32']:.3f} ms",
    ]
    if report["int8_cle_pairs"]:
        lines.append(f"cross-layer equalization of {len(report['int8_cle_pairs'])} conv pairs")
    lines += [
        f"weight range ratio (max/median channel max|w|) {r['range_ratio']:8.2f}  {r['layer']}"
        for r in report["int8_worst_layers"]
    ]
    return lines
