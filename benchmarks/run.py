"""Benchmarks of repsqueeze: one command, markdown and JSON results, PNG charts.

    python benchmarks/run.py                  # CPU, 2 threads: results.{md,json} (~15 min)
    python benchmarks/run.py --device cuda    # GPU: results_cuda.{md,json} (~5 min on an H200)
    python benchmarks/run.py --quick          # tiny sizes, the CI smoke test (temp folder)
    python benchmarks/run.py --only latency,exactness
    python benchmarks/run.py --only training --threads 1 --merge  # one table, the rest kept
    python benchmarks/run.py --plot-only      # redraw the PNGs from the committed JSON files
    python benchmarks/run.py --deploy-time    # deploy time vs timm and the official fusions
    python -m benchmarks.run --quick          # the same, as a module of the benchmarks package

Every comparison runs in this one process with a fixed number of threads, interleaved
(round after round, every variant once per round, so drift hits all alike), timed with
``repsqueeze.timing`` (on ``torch.utils.benchmark.Timer``, which synchronises the device);
figures are medians with their interquartile range, and ratios to the plain network.
Sections:

1. ``latency``: deployed inference (batch 1 and 32): training form, deployed, deployed with
   ``unwrap=True``, hand-written plain networks (one with the model's module nesting, one
   flat ``nn.Sequential``) and timm's reparameterized ``repvgg_a0``, all deployed forms with
   the same weights; ``module calls`` counts the ``nn.Module`` calls of one forward (host-side
   Python that a launch-bound GPU forward pays on top of identical kernels). On CUDA,
   ``graph ms`` replays a captured CUDA graph of the forward: kernel time alone.
2. ``training``: one SGD step. CPU: resnet20_cifar, batch 64, 32x32, fp32, memory = bytes
   autograd saves for backward. Beside each block kind, the peers' blocks on the same
   network (``peers.py``: the official DBB, OREPA and ACB blocks, run from fetched copies of
   their repositories and left out with a note without one; timm's RepVGG and MobileOne
   blocks), and DBB's chain with recomputation. CUDA: repvgg_a0 224x224, batch 64 and 256, fp32 and bf16
   autocast, every block kind in chain and online form, timm's ``repvgg_a0`` training form,
   the hand-written OREPA-style floor (``floor.py``) and compiled rows; memory = peak
   ``torch.cuda.max_memory_allocated`` of the step above what was allocated before the
   variant was built (its parameters, gradients, optimizer state and activations).
3. ``squeeze``: time to deploy a whole RepVGG-B0 (CPU).
4. ``exactness``: largest relative error per block kind, float32 and float64 (CPU).
5. ``accuracy``: digits accuracy per block kind over several seeds (CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/run.py: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import deploy_time, output  # noqa: E402
from benchmarks.common import NOTES, PLAIN, environment  # noqa: E402
from benchmarks.deploying import bench_accuracy, bench_exactness, bench_squeeze  # noqa: E402
from benchmarks.latency import bench_latency  # noqa: E402
from benchmarks.training import bench_training  # noqa: E402
from repsqueeze.tables import table  # noqa: E402

HERE = Path(__file__).resolve().parent
__all__ = ["PLAIN", "SECTIONS", "default_out", "main"]

SECTIONS: dict[str, tuple[str, Callable[[argparse.Namespace], list[dict]]]] = {
    "latency": ("Inference latency (ms, median of interleaved rounds)", bench_latency),
    "training": ("Training step", bench_training),
    "squeeze": ("Squeeze time", bench_squeeze),
    "exactness": ("Exactness: largest relative error, deployed vs training form", bench_exactness),
    "accuracy": ("Accuracy on the embedded digits set", bench_accuracy),
}
DEFAULT_SECTIONS = {"cpu": list(SECTIONS), "cuda": ["latency", "training"]}


def _title(key: str, args: argparse.Namespace) -> str:
    title = SECTIONS[key][0]
    if key == "training":
        if args.device.startswith("cuda"):
            return f"{title} on repvgg_a0 (224x224; fp32 and bf16 autocast; SGD)"
        return f"{title} on resnet20_cifar (batch 64, 32x32; fp32; SGD)"
    return title


def default_out(device: str, quick: bool) -> Path:
    """``benchmarks/results[_cuda]``; quick runs go to a temporary folder, never over the
    committed results."""
    name = "results_cuda" if device.startswith("cuda") else "results"
    root = Path(tempfile.gettempdir()) / "repsqueeze-bench-quick" if quick else HERE
    return root / name


def parser() -> argparse.ArgumentParser:
    """The command line of ``benchmarks/run.py``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--only", default=None, help="comma-separated sections")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (pinned)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=20, help="timing rounds (sections scale it)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batches", default="64,256", help="GPU training batch sizes")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compiled rows in the GPU training table (default: on with CUDA)")  # fmt: skip
    p.add_argument("--compile-batches", default="64", help="batch sizes of compiled rows")
    p.add_argument("--compile-precisions", default="fp32", help="precisions of compiled rows")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark (autotuned algorithms; all variants alike)")  # fmt: skip
    p.add_argument("--out", default=None, help="writes OUT.md, OUT.json and OUT_*.png")
    p.add_argument("--merge", action="store_true",
                   help="keep the other sections of an existing OUT.json (each with the settings it ran under) and rewrite OUT.md from all of them")  # fmt: skip
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the PNGs of benchmarks/results*.json (or --out) and exit")  # fmt: skip
    p.add_argument("--deploy-time", action="store_true",
                   help="the deploy-time table alone (deploy_time.py): results_deploy.{md,json}")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> dict:
    """Runs the sections asked for and writes ``OUT.md``, ``OUT.json`` and the charts."""
    p = parser()
    args = p.parse_args(argv)
    if args.deploy_time:
        out = ["--out", args.out] if args.out else []
        return deploy_time.main(["--quick"] * args.quick + out)
    if args.plot_only:
        _plot_only(args.out)
        return {}
    only = _settle(args, p)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return _run(args, only)


def _plot_only(out: str | None) -> None:
    outs = [Path(out)] if out else [HERE / "results", HERE / "results_cuda"]
    for path in outs:
        if path.with_suffix(".json").is_file():
            for png in output.plot(json.loads(path.with_suffix(".json").read_text()), path):
                print(png)


def _settle(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[str]:
    """Parses the list-valued flags in place; returns the sections to run."""
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.compile_batches = [int(b) for b in args.compile_batches.split(",")]
    args.compile = cuda if args.compile is None else args.compile
    args.compile_precisions = args.compile_precisions.split(",")
    if cuda:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    only = args.only.split(",") if args.only else DEFAULT_SECTIONS["cuda" if cuda else "cpu"]
    unknown = [k for k in only if k not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    if args.quick:
        args.repeats, args.seeds = min(args.repeats, 3), min(args.seeds, 1)
    return only


def _run(args: argparse.Namespace, only: list[str]) -> dict:
    started = time.perf_counter()
    results = {"environment": environment(args.device, args.quick)}
    env = results["environment"]
    where = (
        f"GPU: {env['gpu']}, TF32 {'on' if env['tf32'] else 'off'} (PyTorch default)"
        if args.device.startswith("cuda")
        else f"CPU only, {args.threads} threads"
    )
    command = env["command"] or "benchmarks.run.main()"
    md = [f"# repsqueeze benchmarks\n\n`{command}`; torch {torch.__version__}; {where}.\n"]
    out = Path(args.out) if args.out else default_out(args.device, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    chunks = {}  # section -> its markdown
    if args.merge:
        titles = {k: title for k, (title, _) in SECTIONS.items()}
        env["kept"], kept_rows, chunks = output.kept_sections(out, only, titles)
        results.update(kept_rows)
    for key in only:
        start = time.perf_counter()
        rows = results[key] = SECTIONS[key][1](args)
        notes = NOTES.pop(key, [])
        if notes:
            results.setdefault("notes", {})[key] = notes
        chunks[key] = f"\n## {_title(key, args)}\n\n{table(rows)}\n{output.notes_md(notes)}"
        print(f"[{key}] {time.perf_counter() - start:.1f} s", file=sys.stderr)
        env["seconds"] = round(time.perf_counter() - started, 1)
        md[1:] = [chunks[k] for k in sorted(chunks, key=list(SECTIONS).index)]
        output.write(
            results, md, out
        )  # after every section: a run cut short keeps what it measured
    pngs = output.plot(results, out)
    print("".join(md))
    print(f"wrote {out}.md, {out}.json, {', '.join(map(str, pngs))}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
