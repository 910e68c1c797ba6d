"""Setting the run mode of every block of a model."""

from __future__ import annotations

from torch import nn

from repsqueeze.core.auto import MODES
from repsqueeze.core.blocks import Squeezable


def set_mode(model: nn.Module, mode: str, recompute: bool | None = None) -> nn.Module:
    """Sets ``mode`` (``"chain"``, ``"online"`` or ``"auto"``) on every top-level block.

    Args:
        model: any module.
        mode: see :meth:`repsqueeze.core.blocks.Squeezable.set_mode`.
        recompute: chain mode recomputes each block's inner activations during backward
            instead of keeping them (see :meth:`~repsqueeze.core.blocks.Squeezable.set_mode`);
            ``None`` leaves each block's setting as it is.

    Returns:
        ``model``, changed in place.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(model, Squeezable):
        model.set_mode(mode, recompute)
        return model
    for child in model.children():
        set_mode(child, mode, recompute)
    return model
