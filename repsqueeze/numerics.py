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
    """Runs the region with TF32 disabled for cuDNN convolutions and CUDA matmuls, and
    float32 matmul precision ``"highest"``; the previous settings come back afterwards."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.set_float32_matmul_precision(precision)


def describe_fp32() -> str:
    """How float32 convolutions and matmuls run right now, for logs and reports."""
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    if not torch.cuda.is_available():
        return "float32 (CPU: no TF32)"
    return "float32 with TF32 enabled" if tf32 else "float32 with TF32 disabled"
