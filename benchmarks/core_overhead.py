"""The core's Python overhead: deploy, chain-mode and online-mode training steps, one thread.

    python benchmarks/core_overhead.py                      # this tree: medians, JSON
    python benchmarks/core_overhead.py --against ../main    # this tree vs another, ratios

Small inputs on purpose (resnet20_cifar, batch 8, 16x16; a DBB ``repvgg_a0`` deployed as a
copy), where the time the core spends walking block trees shows most. With ``--against``
the other tree's package is loaded beside this one under another name (a copy with its
imports rewritten) and every round runs each case of both trees in turn, so load on a
shared machine falls on both alike; the figures are medians of the per-round ratios
``this / other`` with their interquartile range.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from repsqueeze import timing

ROOT = Path(__file__).resolve().parents[1]


def cases(rs: ModuleType) -> dict[str, Callable[[], object]]:
    """Label -> one call of each case, built with the package ``rs`` (one thread)."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    calls = {}
    kinds = [("plain", "chain", {}), ("dbb", "chain", {}), ("dbb", "online", {"online_norm": True})]
    kinds += [("expand_ck", "online", {})]
    for kind, mode, kw in kinds:
        model = rs.create_model("resnet20_cifar", block=kind, mode=mode, **kw).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        calls[f"train step {kind} {mode}"] = step
    big = rs.create_model("repvgg_a0", block="dbb").eval()
    calls["deploy repvgg_a0 dbb (copy)"] = lambda: rs.deploy(big)
    return calls


def load_as(tree: Path, name: str) -> ModuleType:
    """The package ``repsqueeze`` of ``tree``, copied under ``name`` with its imports
    rewritten, so that two trees run side by side in one process."""
    folder = Path(tempfile.mkdtemp(prefix="core_overhead_"))
    shutil.copytree(tree / "repsqueeze", folder / name)
    for path in (folder / name).rglob("*.py"):
        text = re.sub(r"\brepsqueeze\b", name, path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def interleaved(packages: dict[str, ModuleType], repeats: int) -> dict[str, dict[str, list]]:
    """Per tree and case, the seconds of each round (:func:`repsqueeze.timing.interleaved_fresh`,
    after one untimed round): every round runs each case of every tree once, in turn, so load
    on a shared machine falls on all alike."""
    calls = {tree: cases(rs) for tree, rs in packages.items()}
    cases_in_order = list(next(iter(calls.values())))
    fns = {
        f"{tree}/{case}": (lambda _, fn=calls[tree][case]: fn())
        for case in cases_in_order
        for tree in calls
    }
    rounds = timing.interleaved_fresh(fns, dict.fromkeys(fns, lambda: None), repeats)
    return {tree: {case: rounds[f"{tree}/{case}"] for case in cases_in_order} for tree in calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, default=None, help="another tree to compare")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    packages = {"this": importlib.import_module("repsqueeze")}
    if args.against is not None:
        packages["other"] = load_as(args.against.resolve(), "repsqueeze_other")
    times = interleaved(packages, args.repeats)
    for case, mine in times["this"].items():
        line = f"{case:32s} this {statistics.median(mine) * 1e3:8.2f} ms"
        if args.against is not None:
            other = times["other"][case]
            ratios = sorted(a / b for a, b in zip(mine, other, strict=True))
            q1, med, q3 = statistics.quantiles(ratios, n=4)
            line += f"  other {statistics.median(other) * 1e3:8.2f} ms"
            line += f"  this/other {med:.3f} (IQR {q1:.3f}-{q3:.3f})"
        print(line)


if __name__ == "__main__":
    main()
