"""INT8 deployment of a deployed (plain) model: what predicts trouble, equalization, and a
verified post-training static quantization in onnxruntime.

Folding BatchNorm and branches gives kernels whose output channels can have very different
ranges (RepVGG users' most frequent INT8 complaint); :func:`weight_ranges` reports, for every
convolution, the per-channel ``max|w|`` and its *range ratio* (largest channel over the
median channel). :func:`equalize` is cross-layer equalization: for two convolutions joined
by a ReLU it rescales output channel ``i`` of the first by ``1/s_i`` and input channel ``i``
of the second by ``s_i``; ``relu(x / s) = relu(x) / s`` for ``s > 0``, so the function is
unchanged. :func:`quantize` exports the model to ONNX, quantizes it with onnxruntime (QDQ,
symmetric per-channel INT8 weights, INT8 activations calibrated on real batches), measures
float and INT8 accuracy and latency in onnxruntime, and writes the INT8 file only when the
accuracy drop is within a limit.

References:
    Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
    ICCV 2019.
    Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from repsqueeze import export
from repsqueeze.core import primitives

FORMAT = "ONNX QDQ: symmetric per-channel INT8 weights, INT8 activations (static, calibrated)"
METHODS = ("minmax", "entropy", "percentile")


class QuantizationError(ValueError):
    """The INT8 model loses more accuracy than allowed; nothing was written."""


# --- what predicts trouble: per-channel weight ranges ----------------------------------------
def channel_ranges(weight: Tensor) -> Tensor:
    """``max|w|`` of every output channel of a conv (or linear) weight, in float64."""
    return weight.detach().double().abs().flatten(1).amax(1)


def range_ratio(weight: Tensor) -> float:
    """Largest over median per-output-channel ``max|w|``; 1 means equal ranges, ``inf`` a
    median channel of zeros. Large values mean that one per-tensor scale would leave most
    channels with few quantization levels, and flag layers whose folded kernel has outliers.
    """
    ranges = channel_ranges(weight)
    median, top = float(ranges.quantile(0.5)), float(ranges.max())
    return top / median if median > 0 else (float("inf") if top > 0 else 1.0)


def weight_ranges(model: nn.Module) -> list[dict[str, Any]]:
    """Range statistics of every convolution of ``model`` (deployed blocks included).

    Returns:
        One row per conv, in module order: ``layer`` (its module path), ``out_channels``,
        ``max_abs`` (largest ``|w|``), ``median_channel_max`` and ``range_ratio``.
    """
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, primitives.CONVS) and m.weight.device.type != "meta":
            ranges = channel_ranges(m.weight)
            rows.append(
                {
                    "layer": name,
                    "out_channels": int(m.weight.shape[0]),
                    "max_abs": float(ranges.max()),
                    "median_channel_max": float(ranges.quantile(0.5)),
                    "range_ratio": range_ratio(m.weight),
                }
            )
    return rows


def worst_layers(
    rows: list[dict[str, Any]], n: int = 3, key: str = "range_ratio"
) -> list[dict[str, Any]]:
    """The ``n`` rows of :func:`weight_ranges` with the largest ``key``, worst first."""
    return sorted(rows, key=lambda r: r[key], reverse=True)[:n]


# --- cross-layer equalization ----------------------------------------------------------------
def relu_conv_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv1, conv2)`` module paths where ``conv2(relu(conv1(x)))`` is all that happens.

    Found on the ``torch.fx`` graph: ``conv1``'s output goes only into an ``nn.ReLU``
    module, whose output goes only into ``conv2``, and each module is called once. Anything
    else (a residual add, a pool, a conv called twice, an untraceable model) is not a pair,
    so equalizing the pairs is exact by construction.
    """
    modules = dict(model.named_modules())
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many types for untraceable Python
        raise ValueError(
            f"{type(model).__name__} cannot be traced with torch.fx ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); cross-layer equalization needs "
            "the graph to prove that a conv's output reaches the next conv only through a ReLU"
        ) from err
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def only_user(node: torch.fx.Node, kind: type | tuple) -> torch.fx.Node | None:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return None
        user = users[0]
        ok = isinstance(modules.get(user.target), kind) and calls[user.target] == 1
        return user if ok and user.args[:1] == (node,) and len(user.args) == 1 else None

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), primitives.CONVS):
            continue
        relu = only_user(node, nn.ReLU) if calls[node.target] == 1 else None
        conv2 = only_user(relu, primitives.CONVS) if relu is not None else None
        if conv2 is not None:
            pairs.append((node.target, conv2.target))
    return pairs


def _input_ranges(conv: nn.Module, weight: Tensor) -> Tensor:
    """``max|w|`` over everything that reads each input channel (groups respected)."""
    g = conv.groups
    per_group = weight.abs().reshape(g, weight.shape[0] // g, weight.shape[1], -1)
    return per_group.amax(dim=(1, 3)).reshape(-1)  # (in_channels,)


def _scale_inputs(conv: nn.Module, weight: Tensor, s: Tensor) -> Tensor:
    g, c_out, c_in_g = conv.groups, weight.shape[0], weight.shape[1]
    shape = (g, c_out // g, c_in_g, *weight.shape[2:])
    scale = s.reshape(g, 1, c_in_g, *([1] * (weight.dim() - 2)))
    return (weight.reshape(shape) * scale).reshape(weight.shape)


@torch.no_grad()
def equalize(
    model: nn.Module, iterations: int = 20, inplace: bool = False
) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Cross-layer equalization of every ``conv -> ReLU -> conv`` pair (Nagel et al. 2019).

    For channel ``i`` between the two convolutions, with ``r1_i = max|W1[i]|`` (output
    channel ``i`` of the first) and ``r2_i = max|W2[:, i]|`` (input channel ``i`` of the
    second), ``s_i = sqrt(r1_i / r2_i)`` divides ``W1[i]`` and ``b1[i]`` and multiplies
    ``W2[:, i]``; both ranges become ``sqrt(r1_i * r2_i)``. ReLU is positively homogeneous,
    so the function is unchanged (up to rounding; the scales are computed in float64 and
    each weight is cast back once per pass). Chains of several pairs are swept
    ``iterations`` times, since equalizing one pair changes its neighbours' ranges.

    Args:
        model: a model whose convolutions are plain modules (e.g. ``repsqueeze.deploy(m)``).
        iterations: sweeps over all pairs.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        ``(model, pairs)``: the equalized model and the ``(conv1, conv2)`` paths it changed.
    """
    if not inplace:
        model = copy.deepcopy(model)
    pairs = relu_conv_pairs(model)
    for _ in range(iterations):
        for first, second in pairs:
            conv1, conv2 = model.get_submodule(first), model.get_submodule(second)
            w1, w2 = conv1.weight.double(), conv2.weight.double()
            r1, r2 = channel_ranges(w1), _input_ranges(conv2, w2)
            live = (r1 > 0) & (r2 > 0)
            s = torch.where(live, (r1 / r2.where(live, 1.0)).sqrt(), 1.0)
            conv1.weight.copy_(w1 / s.reshape(-1, *([1] * (w1.dim() - 1))))
            if conv1.bias is not None:
                conv1.bias.copy_(conv1.bias.double() / s)
            conv2.weight.copy_(_scale_inputs(conv2, w2, s))
    return model, pairs


# --- onnxruntime: static quantization, accuracy, latency -------------------------------------
def _inputs(batch: Tensor | tuple | list) -> np.ndarray:
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return x.detach().cpu().float().numpy()


def quantize_onnx(
    float_path: str | Path,
    int8_path: str | Path,
    calibration: Iterable[Tensor],
    method: str = "minmax",
    per_channel: bool = True,
) -> int:
    """Static INT8 quantization of an ONNX file with onnxruntime; returns the batches used.

    ``quant_pre_process`` (shape inference and graph optimization) runs first, as
    onnxruntime recommends; then ``quantize_static`` in QDQ format with symmetric INT8
    weights (per output channel when ``per_channel``) and INT8 activations whose ranges
    are calibrated on ``calibration``.

    Args:
        float_path: the float ONNX model.
        int8_path: where the INT8 model goes.
        calibration: input batches (tensors, or ``(x, y)`` pairs).
        method: activation calibration, one of :data:`METHODS`.
        per_channel: per-output-channel weight scales.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    batches = [_inputs(b) for b in calibration]
    if not batches:
        raise ValueError("no calibration batches: INT8 activation ranges need real inputs")
    n_batches = len(batches)
    if method != "minmax" and len({b.shape for b in batches}) > 1:
        # histogram calibrators stack the outputs of all runs: feed equal shapes (samples)
        batches = [x[None] for b in batches for x in b]

    class Reader(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.feeds = iter([{name: b} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path),
            Reader(_session(prepared).get_inputs()[0].name),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return n_batches


def _session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_accuracy(
    paths: dict[str, str | Path], data: Iterable[tuple[Tensor, Tensor]]
) -> tuple[dict[str, float], int]:
    """Top-1 accuracy of ONNX classifiers in onnxruntime, all in one pass over the data.

    Args:
        paths: ``{name: ONNX file}``.
        data: ``(x, y)`` batches.

    Returns:
        ``({name: accuracy}, number of samples)``.
    """
    sessions = {k: _session(p) for k, p in paths.items()}
    hits = dict.fromkeys(sessions, 0)
    total = 0
    for x, y in data:
        feed = _inputs(x)
        for k, s in sessions.items():
            (logits,) = s.run(None, {s.get_inputs()[0].name: feed})
            hits[k] += int((logits.argmax(1) == y.numpy()).sum())
        total += len(y)
    if total == 0:
        raise ValueError("no test samples to measure accuracy on")
    return {k: h / total for k, h in hits.items()}, total


def onnx_latency_ms(
    paths: dict[str, str | Path], shape: tuple[int, ...], repeats: int = 20, threads: int = 1
) -> dict[str, float]:
    """Median onnxruntime CPU latency (ms) of each model on a batch of ``shape``, timed in
    turn (interleaved) so that load on the machine hits all models alike."""
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(repeats + 3):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            if i >= 3:  # warm-up runs are not timed
                times[k].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _first_input(data: Iterable) -> Tensor:
    for batch in data:
        return torch.from_numpy(_inputs(batch))
    raise ValueError("no test batches: the INT8 model is checked on the test split")


# --- the whole step -----------------------------------------------------------------------------
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
        ``int8_latency_ms`` (``{float,int8}_b{1,32}``), ``int8_weight_ranges`` (one row per
        conv, with ``range_ratio_cle`` after equalization when ``cle``),
        ``int8_worst_layers``, ``int8_cle_pairs``, ``int8_calibration_batches``,
        ``int8_test_samples``, ``int8_format``, ``int8_bytes``.

    Raises:
        QuantizationError: the drop is above ``max_drop``; nothing is written.
    """
    if not max_drop >= 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    example = _first_input(test)[:1]
    model = copy.deepcopy(model).float().eval()
    ranges = weight_ranges(model)
    pairs: list[tuple[str, str]] = []
    if cle:
        model, pairs = equalize(model, inplace=True)
        for row, after in zip(ranges, weight_ranges(model), strict=True):
            row["range_ratio_cle"] = after["range_ratio"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        export.to_onnx(model, float_path, example, opset=opset)
        n_batches = quantize_onnx(float_path, int8_path, calibration, method)
        models = {"float": float_path, "int8": int8_path}
        accuracy, n_test = onnx_accuracy(models, test)
        acc_float, acc_int8 = accuracy["float"], accuracy["int8"]
        latency = {}
        for batch in (1, 32):
            shape = (batch, *example.shape[1:])
            for k, ms in onnx_latency_ms(models, shape, latency_repeats, latency_threads).items():
                latency[f"{k}_b{batch}"] = ms
        key = "range_ratio_cle" if cle else "range_ratio"
        report = {
            "acc_float": acc_float,
            "acc_int8": acc_int8,
            "int8_acc_drop": acc_float - acc_int8,
            "int8_max_drop": max_drop,
            "int8_latency_ms": latency,
            "int8_weight_ranges": ranges,
            "int8_worst_layers": [
                {"layer": r["layer"], "range_ratio": r[key]}
                for r in worst_layers(ranges, worst, key)
            ],
            "int8_cle_pairs": [list(p) for p in pairs],
            "int8_calibration_batches": n_batches,
            "int8_calibration_method": method,
            "int8_test_samples": n_test,
            "int8_format": FORMAT,
            "int8_bytes": int8_path.stat().st_size,
        }
        if not report["int8_acc_drop"] <= max_drop:
            worst_row = report["int8_worst_layers"][0] if ranges else None
            hint = (
                f"; worst weight range ratio {worst_row['range_ratio']:.1f} in {worst_row['layer']}"
                if worst_row
                else ""
            )
            raise QuantizationError(
                f"INT8 accuracy drop {report['int8_acc_drop']:.4f} above int8_max_drop="
                f"{max_drop} (float {acc_float:.4f}, int8 {acc_int8:.4f}){hint}; "
                f"{path.name} not written (try cross-layer equalization or more calibration batches)"
            )
        os.replace(int8_path, path)
    return report


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
