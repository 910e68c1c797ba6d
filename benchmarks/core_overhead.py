"""The core's Python overhead: deploy, chain-mode and online-mode training steps, one thread.

    python benchmarks/core_overhead.py                      # this tree: medians, JSON
    python benchmarks/core_overhead.py --against ../main    # this tree vs another, ratios

Small inputs on purpose (resnet20_cifar, batch 8, 16x16; a DBB ``repvgg_a0`` deployed as a
copy), where the time the core spends walking block trees shows most. With ``--against``
both trees run in turn, one fresh process each per round (``PYTHONPATH`` pointing at the
tree), so load on a shared machine falls on both alike; the figures are medians of the
per-round ratios ``this / other`` with their interquartile range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: plans, layouts, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(repeats: int) -> dict[str, float]:
    """Median seconds of each case in this process (one thread)."""
    import torch

    import repsqueeze as rs

    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    results = {}
    cases = [("plain", "chain", {}), ("dbb", "chain", {}), ("dbb", "online", {"online_norm": True})]
    cases += [("expand_ck", "online", {})]
    for kind, mode, kw in cases:
        model = rs.create_model("resnet20_cifar", block=kind, mode=mode, **kw).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        results[f"train step {kind} {mode}"] = _median_s(step, repeats)
    big = rs.create_model("repvgg_a0", block="dbb").eval()
    results["deploy repvgg_a0 dbb (copy)"] = _median_s(lambda: rs.deploy(big), max(3, repeats // 4))
    return results


def compare(other: Path, rounds: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per case: the median and interquartile range of the per-round ratios this / other."""
    ratios: dict[str, list[float]] = {}
    for _ in range(rounds):
        got = {}
        for tree in (ROOT, other):
            env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--repeats", str(repeats)]
            out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True)
            got[tree] = json.loads(out.stdout.strip().splitlines()[-1])
        for case, mine in got[ROOT].items():
            ratios.setdefault(case, []).append(mine / got[other][case])
    summary = {}
    for case, rs_ in ratios.items():
        q1, med, q3 = statistics.quantiles(rs_, n=4) if len(rs_) > 1 else rs_ * 3
        summary[case] = {"ratio": statistics.median(rs_), "q1": q1, "q3": q3}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, default=None, help="another tree to compare")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --against")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per case")
    args = parser.parse_args()
    if args.against is None:
        print(json.dumps(measure(args.repeats)))
        return
    for case, s in compare(args.against.resolve(), args.rounds, args.repeats).items():
        print(f"{case:32s} this/other {s['ratio']:.3f}  (IQR {s['q1']:.3f}-{s['q3']:.3f})")


if __name__ == "__main__":
    main()
