"""``repsqueeze.timing``: the one timer measures what it is given, interleaved or alone."""

import time

import pytest

from repsqueeze import timing

pytestmark = pytest.mark.usefixtures("single_thread")


def test_latency_measures_a_known_duration():
    """A call that sleeps 2 ms: the median is 2 ms and a bit, never less; every timed call
    is a real call."""
    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.002)

    result = timing.latency(fn, min_run_time=0.05)
    assert 2.0 <= result["median_ms"] < 20.0
    assert result["iqr_ms"] >= 0
    assert result["blocks"] >= 5 and result["calls"] >= result["blocks"]
    assert result["calls"] * result["median_ms"] * 1e-3 >= 0.8 * 0.05  # min_run_time
    assert len(calls) > result["calls"]  # Timer.timeit warms up before each block
    assert 2.0 <= timing.latency_ms(fn, repeats=5, warmup=1) < 20.0


def test_interleaved_times_every_function_once_per_round_in_turn():
    """Each round times one block of each function, in order; sleeps of 1 and 6 ms come out
    in that order, each at least its sleep."""
    order = []

    def sleeper(name: str, seconds: float):
        def fn() -> None:
            order.append(name)
            time.sleep(seconds)

        return fn

    times = timing.interleaved({"a": sleeper("a", 0.001), "b": sleeper("b", 0.006)}, rounds=4)
    assert set(times) == {"a", "b"}
    assert 1.0 <= timing.ms(times["a"])[0] < timing.ms(times["b"])[0]
    assert timing.ms(times["b"])[0] >= 6.0 and timing.ms(times["b"])[1] >= 0
    timed = order[-3 * 4 * 2 :]  # per round and function: two warm-up calls and one timed
    assert timed == (["a"] * 3 + ["b"] * 3) * 4


def test_interleaved_fresh_gives_each_call_a_new_argument_and_times_only_the_call():
    made, seen = [], []

    def fresh() -> list:
        made.append([])
        time.sleep(0.05)  # not timed
        return made[-1]

    def fn(arg: list) -> None:
        seen.append(arg)
        time.sleep(0.001)

    times = timing.interleaved_fresh({"f": fn}, {"f": fresh}, rounds=3)
    assert len(times["f"]) == 3 and all(0.001 <= t < 0.05 for t in times["f"])
    assert len(seen) == 4 and all(a is b for a, b in zip(seen, made, strict=True))  # 1 warm-up


def test_threads_sets_and_restores_the_count():
    import torch

    before = torch.get_num_threads()
    with timing.threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with timing.threads(None):
        assert torch.get_num_threads() == before
