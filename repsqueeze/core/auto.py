"""``mode="auto"``: per block, the faster of chain and online mode, measured where it runs.

At the first batch of each (input shape, dtype, device, training, grad) both forms are
timed and the faster one is kept for the block; a BatchNorm with batch statistics inside
the composed part forces chain mode. Under ``torch.compile`` nothing is timed: a decision
taken before compiling is reused, else the multiply-accumulate model
(:func:`repsqueeze.core.cost.macs`) decides.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from repsqueeze import timing
from repsqueeze.core import cost, online, running
from repsqueeze.core.tree import Combinator

MODES = ("chain", "online", "auto")
AUTO_REPEATS = 3  # timed runs of each form per decision of mode="auto"
_OWNER = "auto"


def forget(block: Combinator) -> None:
    """Drops the block's decisions (its mode changed)."""
    block.memo(_OWNER).clear()


def decisions(block: Combinator) -> dict[tuple, str]:
    """The block's decisions so far: ``(shape, dtype, device, training, batch-stat BN)`` ->
    ``"chain"`` or ``"online"``."""
    return dict(block.memo(_OWNER))


def pick_mode(block: Combinator, x: Tensor, ndim: int) -> str:
    """``"chain"`` or ``"online"`` for this forward pass.

    ``mode="auto"``: at the first batch of each (input shape, dtype, device, training, grad)
    both forms are timed (:func:`choose_by_timing`) and the faster one is kept for the block;
    a BatchNorm with batch statistics inside the composed part forces ``"chain"``. Under
    ``torch.compile`` nothing is timed: a decision taken before compiling is reused, else the
    multiply-accumulate model decides (:func:`choose_by_macs`).
    """
    if block.mode != "auto":
        return block.mode
    training = torch.is_grad_enabled() and block.training
    key = (tuple(x.shape), x.dtype, x.device, training, online.bn_blocks_online(block, ndim))
    choice = block.memo(_OWNER).get(key)
    if choice is not None:
        return choice
    if key[-1]:
        choice = "chain"
    elif torch.compiler.is_compiling():
        return choose_by_macs(block, tuple(x.shape), ndim)
    else:
        choice = choose_by_timing(block, x, ndim)
    block.memo(_OWNER)[key] = choice
    return choice


def choose_by_macs(block: Combinator, shape: tuple[int, ...], ndim: int) -> str:
    """The mode with fewer multiply-accumulates for an input of ``shape`` (batch first)."""
    if online.bn_blocks_online(block, ndim):
        return "chain"
    costs = cost.macs(block, tuple(shape[1:]), batch=shape[0])
    return "online" if costs["online"] < costs["chain"] else "chain"


def choose_by_timing(block: Combinator, x: Tensor, ndim: int) -> str:
    """Times both forms on ``x`` (forward, and backward to the parameters when training)
    and returns the faster; running statistics and gradients are left as they were."""
    params = [p for p in block.parameters() if p.requires_grad]
    backward = torch.is_grad_enabled() and block.training and bool(params)
    saved = [b.detach().clone() for b in block.buffers()]
    x = x.detach()

    def step(run: Callable[[], Tensor]) -> Callable[[], object]:
        def go() -> object:
            y = run()
            if backward:
                return torch.autograd.grad(y.sum(), params, allow_unused=True)
            return y

        return go

    runs = {
        "chain": step(lambda: running.run_block(block, x, ndim)),
        "online": step(lambda: online.forward(block, x, ndim)),
    }
    try:
        with torch.set_grad_enabled(backward):
            times = time_interleaved(runs, AUTO_REPEATS)
    finally:
        with torch.no_grad():
            for b, v in zip(block.buffers(), saved, strict=True):
                b.copy_(v)
    return min(times, key=times.get)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in turn by :func:`repsqueeze.timing.interleaved`."""
    return {k: m.median for k, m in timing.interleaved(fns, repeats).items()}
