"""INT8 benchmark: float vs INT8 accuracy of every block kind after deployment.

    python benchmarks/int8.py                    # digits, 3 seeds, 3 epochs (see results_int8.md for the time)
    python benchmarks/int8.py --quick            # 2 kinds, 1 seed, 1 epoch: a smoke test
    python benchmarks/int8.py --cifar-dir data/  # adds CIFAR-10 when its files are there

For every kind in :data:`repsqueeze.zoo.BLOCKS` and seed: train the digits network, deploy
it, and quantize it with :func:`repsqueeze.quant.quantize` (onnxruntime static quantization:
QDQ, per-channel INT8 weights, INT8 activations calibrated on training batches), with and
without cross-layer equalization; test accuracy of the float and the INT8 ONNX model, the
drop, and the worst per-layer weight range ratio of the deployed convs (largest over median
per-channel ``max|w|``), which predicts INT8 trouble. Writes ``OUT.md`` and ``OUT.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # python benchmarks/int8.py: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import repsqueeze as rs  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.deploying import fit  # noqa: E402  (the accuracy benchmark's training)
from benchmarks.output import finite  # noqa: E402
from repsqueeze import quant  # noqa: E402
from repsqueeze.models import create_model  # noqa: E402
from repsqueeze.tables import table  # noqa: E402
from repsqueeze.training.datamodules import CIFAR10DataModule, DigitsDataModule  # noqa: E402
from repsqueeze.zoo import BLOCKS  # noqa: E402

KINDS = list(BLOCKS)
COLUMNS = [
    "float acc", "INT8 acc", "drop", "INT8 acc (CLE)", "drop (CLE)", "worst range ratio",
    "worst range ratio (CLE)",
]  # fmt: skip


def measure(
    kind: str, model_name: str, data, args: argparse.Namespace, seed: int, folder: Path
) -> dict:
    """Trains one model, deploys it and quantizes it with and without equalization."""
    torch.manual_seed(seed)
    model = create_model(
        model_name, block=kind, num_classes=data.num_classes, in_channels=data.in_channels
    )
    fit(model, data, args.epochs)
    deployed = rs.deploy(model.eval())
    out = {"worst range ratio": max(r["range_ratio"] for r in quant.weight_ranges(deployed))}
    for cle in (False, True):
        report = quant.quantize(
            deployed, itertools.islice(data.train_dataloader(), args.calibration_batches),
            data.test_dataloader(), folder / f"{kind}.int8.onnx", max_drop=1.0, cle=cle,
            latency_repeats=1 if cle else args.repeats, latency_threads=args.threads,
        )  # fmt: skip
        tag = " (CLE)" if cle else ""
        out["float acc"] = report["acc_float"]
        out[f"INT8 acc{tag}"] = report["acc_int8"]
        out[f"drop{tag}"] = report["int8_acc_drop"]
        if cle:
            out["worst range ratio (CLE)"] = max(
                r["range_ratio_cle"] for r in report["int8_weight_ranges"]
            )
        else:
            out["latency"] = report["int8_latency_ms"]
    return out


def bench(dataset: str, model_name: str, data, args: argparse.Namespace) -> tuple[list, dict]:
    kinds = KINDS[:2] if args.quick else KINDS
    rows, latencies = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            runs = [measure(kind, model_name, data, args, s, Path(tmp)) for s in range(args.seeds)]
            latencies += [r.pop("latency") for r in runs]
            row = {"data": dataset, "block": kind}
            row.update({k: statistics.mean(r[k] for r in runs) for k in COLUMNS})
            row["worst drop"] = max(r["drop"] for r in runs)
            rows.append(row)
            print(f"[{dataset}] {kind}: {row}", file=sys.stderr)
    latency = {k: statistics.median(lat[k] for lat in latencies) for k in latencies[0]}
    return rows, latency


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 kinds, 1 seed, 1 epoch")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per latency figure")
    parser.add_argument("--cifar-dir", default="data/", help="CIFAR-10 folder (skipped if absent)")
    parser.add_argument("--cifar-epochs", type=int, default=15)
    parser.add_argument("--out", default="benchmarks/results_int8", help="writes OUT.md, OUT.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.cifar_epochs, args.repeats = 1, 1, 1, 3
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: dict = {"environment": environment("cpu", args.quick)}
    digits = DigitsDataModule(batch_size=64)
    digits.setup()
    results["digits"], results["latency_ms"] = bench("digits", "digits_net", digits, args)
    cifar = CIFAR10DataModule(data_dir=args.cifar_dir, num_workers=0, batch_size=128)
    try:
        cifar.prepare_data()
        cifar.setup()
    except FileNotFoundError as err:
        results["cifar10"] = []
        results["notes"] = [f"CIFAR-10 skipped: {err}"]
    else:
        epochs, args.epochs = args.epochs, args.cifar_epochs
        results["cifar10"], _ = bench("cifar10", "resnet20_cifar", cifar, args)
        args.epochs = epochs
        results["notes"] = []
    results["seconds"] = time.perf_counter() - start
    md = markdown(results, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(finite(results), indent=2, allow_nan=False))
    out.with_suffix(".md").write_text(md)
    print(md)
    return results


def markdown(results: dict, args: argparse.Namespace) -> str:
    env, lat = results["environment"], results["latency_ms"]
    lines = [
        "# INT8 benchmark",
        "",
        f"`{env['command']}`; torch {env['torch']}; CPU only, {args.threads} threads; "
        f"{args.seeds} seeds, {args.epochs} epochs, {args.calibration_batches} calibration "
        f"batches; {results['seconds'] / 60:.1f} min.",
        "",
        f"Quantization: {quant.FORMAT}, onnxruntime `quantize_static`, MinMax calibration.",
        "",
        "## Accuracy (test split, mean over seeds)",
        "",
        table(results["digits"] + results["cifar10"]),
        "",
        "## onnxruntime CPU latency of the deployed digits network (ms, median over runs)",
        "",
        table(
            [{"batch": b, "float": lat[f"float_b{b}"], "INT8": lat[f"int8_b{b}"]} for b in (1, 32)]
        ),
        "",
    ]
    lines += [f"Note: {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
