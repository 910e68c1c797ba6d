"""INT8 deployment of a deployed (plain) model: what predicts trouble (:mod:`.ranges`),
cross-layer equalization (:mod:`.equalization`), static quantization in onnxruntime
(:mod:`.calibration`), its accuracy and latency (:mod:`.runtime`), and the verified step that
writes the INT8 file only when the accuracy drop is within a limit (:mod:`.pipeline`)."""

from repsqueeze.quant.calibration import METHODS, quantize_onnx
from repsqueeze.quant.equalization import equalize, relu_conv_pairs
from repsqueeze.quant.pipeline import FORMAT, QuantizationError, quantize, summary
from repsqueeze.quant.ranges import (
    channel_ranges,
    input_ranges,
    range_ratio,
    weight_ranges,
    worst_layers,
)
from repsqueeze.quant.runtime import onnx_accuracy, onnx_latency_ms

__all__ = [
    "FORMAT",
    "METHODS",
    "QuantizationError",
    "channel_ranges",
    "equalize",
    "input_ranges",
    "onnx_accuracy",
    "onnx_latency_ms",
    "quantize",
    "quantize_onnx",
    "range_ratio",
    "relu_conv_pairs",
    "summary",
    "weight_ranges",
    "worst_layers",
]
