"""Accuracy and latency of ONNX classifiers in onnxruntime, measured side by side."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from torch import Tensor

from repsqueeze import timing
from repsqueeze.export import onnx_session
from repsqueeze.quant.calibration import as_numpy


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
    sessions = {k: onnx_session(p) for k, p in paths.items()}
    hits = dict.fromkeys(sessions, 0)
    total = 0
    for x, y in data:
        feed = as_numpy(x)
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
    """Median onnxruntime CPU latency (ms) of each model on a batch of ``shape``, timed
    interleaved (:func:`repsqueeze.timing.interleaved`) so that load on the machine hits all
    models alike; about ``repeats`` runs per model in all (each timed run comes after two
    warm-up runs), ``threads`` intra-op threads."""
    sessions = {k: onnx_session(p, threads) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    runs = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for k, s in sessions.items()}
    times = timing.interleaved(runs, rounds=max(1, -(-repeats // 3)))
    return {k: timing.ms(m)[0] for k, m in times.items()}
