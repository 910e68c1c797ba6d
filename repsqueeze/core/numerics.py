"""Reduced-precision switches that an exactness check must turn off.

On Ampere and later GPUs cuDNN runs float32 convolutions in TF32 by default
(``torch.backends.cudnn.allow_tf32`` is ``True``), which rounds operands to 10 mantissa
bits: a deployed-vs-training comparison would then measure TF32 noise (about 1e-4
relative), not the squeeze (about 1e-7). :func:`strict_fp32` turns TF32 off for a region
and restores the previous settings after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """Runs the region with TF32 disabled for cuDNN convolutions and CUDA matmuls; the
    previous settings come back afterwards.

    Uses the API the process already uses: the legacy ``allow_tf32`` flags, or, when those
    cannot be read (PyTorch refuses once the per-operator ``fp32_precision`` API has been
    used), that API. Mixing the two, or ``torch.set_float32_matmul_precision`` (which also
    flips the CPU's oneDNN matmul), leaves flags that later reads refuse.
    """
    b = torch.backends
    try:
        legacy = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32
    except RuntimeError:
        legacy = None
    if legacy is not None:
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
    else:
        saved = b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision
        b.cudnn.conv.fp32_precision = b.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = legacy
        else:
            b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision = saved


def tf32_enabled() -> bool:
    """Whether cuDNN convolutions or CUDA matmuls may run float32 in TF32 right now."""
    b = torch.backends
    try:
        return b.cudnn.allow_tf32 or b.cuda.matmul.allow_tf32
    except RuntimeError:  # the per-operator API is in use
        return "tf32" in (b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision)


def describe_fp32() -> str:
    """How float32 convolutions and matmuls run right now, for logs and reports."""
    if not torch.cuda.is_available():
        return "float32 (CPU: no TF32)"
    return "float32 with TF32 enabled" if tf32_enabled() else "float32 with TF32 disabled"
