"""Static INT8 quantization of an ONNX file with onnxruntime, calibrated on real batches."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from torch import Tensor

from repsqueeze.export import onnx_session

METHODS = ("minmax", "entropy", "percentile")


def as_numpy(batch: Tensor | tuple | list) -> np.ndarray:
    """The input of a batch (a tensor, or the ``x`` of an ``(x, y)`` pair) as float32 numpy."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    return x.detach().cpu().float().numpy()


def calibration_batches(calibration: Iterable[Tensor], method: str) -> tuple[list[np.ndarray], int]:
    """The calibration inputs as onnxruntime feeds them, and the number of batches given.

    Histogram calibrators (``entropy``, ``percentile``) stack the outputs of all runs, so
    batches of unequal shapes are fed sample by sample.

    Raises:
        ValueError: an unknown ``method``, or no batches.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    batches = [as_numpy(b) for b in calibration]
    if not batches:
        raise ValueError("no calibration batches: INT8 activation ranges need real inputs")
    n_batches = len(batches)
    if method != "minmax" and len({b.shape for b in batches}) > 1:
        batches = [x[None] for b in batches for x in b]
    return batches, n_batches


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
    from onnxruntime import quantization as q  # optional dependency (the export extra)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches, n_batches = calibration_batches(calibration, method)
    methods = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }

    class Reader(q.CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.feeds = iter([{name: b} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))
        q.quantize_static(
            str(prepared),
            str(int8_path),
            Reader(onnx_session(prepared).get_inputs()[0].name),
            quant_format=q.QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=q.QuantType.QInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return n_batches
