"""Rewriting a model trained as a naive chain of padded layers into exact blocks."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from repsqueeze.core import primitives
from repsqueeze.core.blocks import Squeezable, SqueezableBlock


@dataclass
class BorderReport:
    """What :func:`make_border_consistent` changed.

    Attributes:
        rewritten: paths of the new blocks, each with the layers it took over.
        skipped: ``(path, reason)`` for linear runs that could not be rewritten.
        border_change: per new block, the largest change of its output at the border
            (relative to its output scale) on the sample input.
        interior_change: the same away from the border (zero up to rounding).
        output_change: largest change of the model's output, relative to its scale.
    """

    rewritten: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    border_change: dict[str, float] = field(default_factory=dict)
    interior_change: dict[str, float] = field(default_factory=dict)
    output_change: float | None = None


def make_border_consistent(
    model: nn.Module, sample: Tensor | None = None, inplace: bool = False
) -> tuple[nn.Module, BorderReport]:
    """Rewrites linear runs of padded layers into :class:`SqueezableBlock` s, same weights.

    For a model trained as a naive chain (``conv -> conv``, ``conv -> BN -> conv`` with no
    non-linearity between, inside an ``nn.Sequential``): the rewritten model agrees with the
    old one away from the borders and differs at them, by an amount the report measures on
    ``sample``; a short fine-tune recovers the accuracy, and deploying is then exact.

    Args:
        model: any module; runs inside every ``nn.Sequential`` are considered.
        sample: an input batch to measure the change on (optional).
        inplace: mutate ``model`` instead of a deep copy.

    Returns:
        ``(new_model, report)``.
    """
    reference = copy.deepcopy(model) if sample is not None else None
    if not inplace:
        model = copy.deepcopy(model)
    report = BorderReport()
    _rewrite_runs(model, "", report)
    if reference is not None:
        _measure_border_change(reference, model, sample, report)
    return model, report


def _rewrite_runs(module: nn.Module, path: str, report: BorderReport) -> None:
    for name, child in list(module.named_children()):
        if not isinstance(child, Squeezable):
            _rewrite_runs(child, f"{path}{name}.", report)
    if not isinstance(module, nn.Sequential) or isinstance(module, Squeezable):
        return
    layers, out, run = list(module.named_children()), [], []
    for name, layer in [*layers, ("", None)]:
        if layer is not None and primitives.is_primitive(layer):
            run.append((name, layer))
            continue
        out += _squeeze_run(run, path, report)
        run = []
        if layer is not None:
            out.append((name, layer))
    if len(out) != len(layers):
        for name, _ in layers:
            delattr(module, name)
        for name, layer in out:
            module.add_module(name, layer)


def _squeeze_run(run: list[tuple[str, nn.Module]], path: str, report: BorderReport) -> list:
    convs = [m for _, m in run if isinstance(m, primitives.CONVS)]
    padded = [m for _, m in run if any(map(any, _pads(m)))]
    if len(convs) < 2 or not padded:
        return run  # already exact: at most one convolution, or nothing pads
    names = [f"{path}{n}" for n, _ in run]
    try:
        block = SqueezableBlock(*(m for _, m in run))
    except (TypeError, ValueError) as err:
        report.skipped.append((f"{names[0]}..{names[-1]}", str(err)))
        return run
    report.rewritten[f"{path}{run[0][0]}"] = names
    return [(run[0][0], block)]


def _pads(layer: nn.Module) -> tuple:
    ndim = primitives.ndim_of(layer) or 2
    return primitives.geometry(layer, ndim, "").pad


@torch.no_grad()
def _measure_border_change(old: nn.Module, new: nn.Module, x: Tensor, report: BorderReport) -> None:
    captured: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, inp, p=p: captured.__setitem__(p, inp[0]))
        for p, m in _blocks_at(new, report.rewritten)
    ]
    modes = [(m, m.training) for m in (*old.modules(), *new.modules())]
    old.eval()
    new.eval()
    try:
        y_new, y_old = new(x), old(x)
        report.output_change = float(
            (y_new - y_old).abs().max() / y_old.abs().max().clamp_min(1e-30)
        )
        for p, block in _blocks_at(new, report.rewritten):
            _block_border_change(p, block, captured[p], report)
    finally:  # every module back in its own mode; no BatchNorm statistics were updated
        for m, training in modes:
            m.training = training
        for h in hooks:
            h.remove()


def _block_border_change(
    path: str, block: SqueezableBlock, x: Tensor, report: BorderReport
) -> None:
    """How far the block's output moved from the naive chain's, at and off the border."""
    a, b = nn.Sequential(*block.layers)(x), block(x)
    scale = float(a.abs().max().clamp_min(1e-30))
    geo = block.geometry(x.dim() - 2)
    margin = tuple(
        slice(-(-pl // s), a.shape[d + 2] - (-(-pr // s)))
        for d, ((pl, pr), s) in enumerate(zip(geo.pad, geo.stride, strict=True))
    )
    inner = (slice(None), slice(None), *margin)
    diff = (a - b).abs()
    report.interior_change[path] = float(diff[inner].max()) / scale if diff[inner].numel() else 0.0
    report.border_change[path] = float(diff.max()) / scale


def _blocks_at(model: nn.Module, paths: dict[str, list[str]]) -> list[tuple[str, SqueezableBlock]]:
    return [(p, model.get_submodule(p)) for p in paths]
