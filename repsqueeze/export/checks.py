"""Checks and measurements of a deployed model: finite weights, the largest relative
difference between training and deployed forms (TF32 off), parameters and multiply-accumulates
(from ``torch.utils.flop_counter``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from repsqueeze.core import primitives
from repsqueeze.core.blocks import Squeezable
from repsqueeze.core.numerics import strict_fp32
from repsqueeze.surgery import deploy


def check_weights(state_dict: Mapping[str, Tensor], where: str) -> None:
    """Refuses NaN/Inf in any floating tensor and a negative BatchNorm ``running_var``.

    Args:
        state_dict: the tensors to check.
        where: what they come from, for the message (a file, a function).

    Raises:
        ValueError: naming the first offending key.
    """
    floats = {
        k: v for k, v in state_dict.items() if isinstance(v, Tensor) and v.is_floating_point()
    }
    roots = [v.sqrt() for k, v in floats.items() if k.endswith("running_var")]  # nan if < 0
    if primitives.all_finite([*floats.values(), *roots]):  # at once; key by key to name one
        return
    for key, value in state_dict.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{where}: {key} holds {bad} NaN/Inf value(s)")
        if key.endswith("running_var") and bool((value < 0).any()):
            raise ValueError(
                f"{where}: {key} has negative entries (min {float(value.min()):.3g}); a "
                "variance is never negative"
            )


# --- verification --------------------------------------------------------------------------
@torch.no_grad()
def relative_error(
    reference: nn.Module, candidate: nn.Module, x: Tensor, dtype: torch.dtype
) -> float:
    """``max|ref(x) - cand(x)| / max|ref(x)|`` with both models and ``x`` cast to ``dtype``."""
    ref = copy.deepcopy(reference).to(dtype).eval()
    cand = copy.deepcopy(candidate).to(dtype).eval()
    x = x.to(dtype)
    a, b = ref(x), cand(x)
    scale = a.abs().max().clamp_min(torch.finfo(dtype).tiny)
    return float((a - b).abs().max() / scale)


def verify(
    training: nn.Module,
    deployed: nn.Module,
    inputs: dict[str, Tensor],
    tol32: float = 1e-5,
    tol64: float = 1e-10,
) -> dict[str, dict[str, float]]:
    """Largest relative difference between the two forms, per input and dtype.

    float64 checks the squeeze itself: a float64 copy of the training form against its own
    deployment, so float32 rounding of the stored weights cannot hide an error. float32
    checks the artifact: ``deployed`` as it will be written, against the training form.
    Both run with TF32 off (:func:`repsqueeze.core.numerics.strict_fp32`): on a GPU, TF32 noise
    (about 1e-4) would otherwise be measured instead of the squeeze. Inputs run on the
    models' device.

    Args:
        training: the model in training form.
        deployed: the deployed model.
        inputs: named input batches (e.g. ``{"random": ..., "data": ...}``).
        tol32: tolerance in float32.
        tol64: tolerance in float64.

    Returns:
        ``{input name: {"float32": err, "float64": err}}``.

    Raises:
        ValueError: a tolerance is exceeded; the message says where and by how much.
    """
    exact = copy.deepcopy(training).double()
    exact_deployed = deploy(exact)
    device = next((t.device for t in training.parameters()), torch.device("cpu"))
    report = {}
    with strict_fp32():
        for name, x in inputs.items():
            x = x.to(device)
            report[name] = {
                "float64": relative_error(exact, exact_deployed, x, torch.float64),
                "float32": relative_error(training, deployed, x, torch.float32),
            }
            for dtype, tol in (("float64", tol64), ("float32", tol32)):
                if not report[name][dtype] <= tol:
                    raise ValueError(
                        f"deployed model differs from the training form on {name} input in "
                        f"{dtype}: relative error {report[name][dtype]:.3e} > tolerance {tol:.0e}"
                    )
    return report


def has_blocks(model: nn.Module) -> bool:
    """Whether ``model`` holds a re-parameterizable block still in training form."""
    return any(isinstance(m, Squeezable) and not m.deployed for m in model.modules())


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


# --- measurements ----------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-accumulates of one eval-mode forward pass over ``x``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` over the aten operations that
    actually run (convolutions, matrix products; a multiply-accumulate is two FLOPs), so a
    training-form block is counted as it computes: a chain's inner layers over the padded
    border too, an online block's kernel composition too. The model's mode is restored.
    """
    training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(training)
    return counter.get_total_flops() // 2
