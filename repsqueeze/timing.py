"""The one timer of the project, on ``torch.utils.benchmark``.

Every wall-time figure (deploy's latency columns, the INT8 report, the benchmarks) comes from
here. Calls are timed with ``torch.utils.benchmark.Timer`` (which synchronises CUDA) at the
current thread count (:func:`threads` sets one for a region); several variants are timed
*interleaved*, one block of each per round, so that load on the machine hits all of them
alike; results are ``Measurement`` objects (``.median``, ``.iqr`` in seconds per call), or
their median and spread in milliseconds (:func:`ms`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping

import torch
from torch.utils import benchmark
from torch.utils.benchmark import Measurement


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Runs the region with ``n`` intra-op threads (``None``: as they are), then restores."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def timer(fn: Callable[[], object], label: str = "") -> benchmark.Timer:
    """A ``Timer`` of ``fn()`` at the current thread count (``Timer`` would pin 1 thread)."""
    return benchmark.Timer(
        "fn()", globals={"fn": fn}, description=label, num_threads=torch.get_num_threads()
    )


def calls_per_block(t: benchmark.Timer, block_s: float) -> int:
    """Calls that last about ``block_s`` seconds (one call at least; one when ``block_s``
    is 0), from one timed call after ``Timer``'s own warm-up."""
    if block_s <= 0:
        return 1
    return max(1, math.ceil(block_s / max(t.timeit(1).median, 1e-9)))


def interleaved(
    fns: Mapping[str, Callable[[], object]], rounds: int, block_s: float = 0.0
) -> dict[str, Measurement]:
    """Times each function, interleaved: every round times one block of each in turn.

    Each function is warmed up (``Timer.timeit`` calls it twice before each block:
    cuDNN autotuning, allocator, compilation) and sized to blocks of about ``block_s``
    seconds.

    Args:
        fns: ``{name: function of no argument}``.
        rounds: timed blocks per function.
        block_s: seconds per block (0: one call per block).

    Returns:
        ``{name: Measurement}``; ``.median`` and ``.iqr`` are seconds per call over blocks.
    """
    timers = {k: timer(fn, k) for k, fn in fns.items()}
    number = {k: calls_per_block(t, block_s) for k, t in timers.items()}
    runs: dict[str, list[Measurement]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, t in timers.items():
            runs[k].append(t.timeit(number[k]))
    return {k: Measurement.merge(v)[0] for k, v in runs.items()}


def interleaved_fresh(
    fns: Mapping[str, Callable[[object], object]],
    fresh: Mapping[str, Callable[[], object]],
    rounds: int,
) -> dict[str, list[float]]:
    """Seconds of ``fn(arg)`` per round, each on a new ``arg = fresh[name]()`` (not timed),
    interleaved, after one untimed warm-up round: for calls that change their argument
    (an in-place deploy) and take long enough that one call is a block.

    Returns:
        ``{name: [seconds of round 1, ...]}``, in round order, so that ratios between two
        variants can be taken round by round.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):  # round 0 warms up (imports, allocator, first calls)
        for k, fn in fns.items():
            arg = fresh[k]()
            sync()
            start = time.perf_counter()
            fn(arg)
            sync()
            if r:
                times[k].append(time.perf_counter() - start)
    return times


def ms(m: Measurement) -> tuple[float, float]:
    """``(median, interquartile range)`` of a measurement, in milliseconds per call."""
    return m.median * 1e3, m.iqr * 1e3


def latency(fn: Callable[[], object], min_run_time: float = 0.3, blocks: int = 5) -> dict:
    """Wall time of ``fn()``, median and spread, under ``torch.no_grad``.

    Blocks of calls lasting at least a millisecond each (timer overhead is microseconds),
    at least ``blocks`` of them and at least ``min_run_time`` seconds in all, each a
    ``Timer.timeit`` (which warms up first), merged into one ``Measurement``.
    (``blocked_autorange`` sizes its blocks to keep timer overhead under 1e-4, which on a
    busy machine can leave one block and no spread.) The thread count is the current one.

    Args:
        fn: the call to time.
        min_run_time: seconds of timed calls at least.
        blocks: timed blocks at least.

    Returns:
        ``{"median_ms", "iqr_ms", "blocks", "calls"}``: median and interquartile range per
        call over the blocks, the number of blocks and of timed calls.
    """
    t = timer(fn)
    with torch.no_grad():
        number = calls_per_block(t, 1e-3)
        runs, elapsed = [], 0.0
        while len(runs) < blocks or elapsed < min_run_time:
            runs.append(t.timeit(number))
            elapsed += runs[-1].raw_times[0]
        (m,) = Measurement.merge(runs)
    median, iqr = ms(m)
    return {"median_ms": median, "iqr_ms": iqr, "blocks": len(runs), "calls": len(runs) * number}


def latency_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds: :func:`latency` after ``warmup`` calls,
    about ``repeats`` calls in all (a block of one call costs three: ``Timer.timeit`` warms
    up twice), in at least 5 blocks."""
    for _ in range(warmup):
        fn()
    return latency(fn, min_run_time=0.0, blocks=max(5, repeats // 3))["median_ms"]
