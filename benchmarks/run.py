"""Benchmarks of repsqueeze: one command, markdown and JSON results, PNG charts.

    python benchmarks/run.py                  # CPU, 2 threads: results.{md,json} (~15 min)
    python benchmarks/run.py --device cuda    # GPU: results_cuda.{md,json} (~5 min on an H200)
    python benchmarks/run.py --quick          # tiny sizes, the CI smoke test (temp folder)
    python benchmarks/run.py --only latency,exactness
    python benchmarks/run.py --only training --threads 1 --merge  # one table, the rest kept
    python benchmarks/run.py --plot-only      # redraw the PNGs from the committed JSON files
    python benchmarks/run.py --deploy-time    # deploy time vs timm and the official fusions

Every comparison runs in this one process with a fixed number of threads, interleaved
(round after round, every variant once per round, so drift hits all alike), timed with
``torch.utils.benchmark.Timer`` (which synchronises the device); figures are medians with
their interquartile range, and ratios to the plain network. Sections:

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
import contextlib
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Measurement, Timer
from tqdm import tqdm

import repsqueeze as rs
from repsqueeze.export import count_params, relative_error
from repsqueeze.models import create_model
from repsqueeze.tables import table
from repsqueeze.zoo import BLOCKS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import floor  # noqa: E402
import peers  # noqa: E402

KINDS = list(BLOCKS)
HERE = Path(__file__).resolve().parent
PLAIN = "hand-written plain"
NOTES: dict[str, list[str]] = {}  # section -> lines printed under its table


# --- timing ----------------------------------------------------------------------------------
def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, block_s: float = 0.05
) -> dict[str, Measurement]:
    """Times each function with ``torch.utils.benchmark.Timer``, interleaved.

    Each function is warmed up (cuDNN autotuning, allocator, compilation) and calibrated to
    ``number`` calls per block of about ``block_s`` seconds; then ``rounds`` rounds time one
    block of every function in turn.

    Returns:
        One :class:`Measurement` per function (``.median``, ``.iqr`` in seconds per call).
    """
    threads = torch.get_num_threads()  # Timer would otherwise pin 1 thread
    timers = {
        k: Timer("fn()", globals={"fn": fn}, description=k, num_threads=threads)
        for k, fn in fns.items()
    }
    number = {}
    for k, timer in timers.items():
        timer.timeit(2)
        number[k] = max(1, round(block_s / timer.timeit(1).median)) if block_s > 0 else 1
    runs: dict[str, list[Measurement]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, timer in timers.items():
            runs[k].append(timer.timeit(number[k]))
    return {k: Measurement.merge(v)[0] for k, v in runs.items()}


def _ms(m: Measurement) -> tuple[float, float]:
    """``(median, IQR)`` in milliseconds."""
    return m.median * 1e3, m.iqr * 1e3


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters, so folding BN is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=gen) * 2 - 1)
    return model


def _progress(items: list, desc: str) -> tqdm:
    return tqdm(items, desc=desc, file=sys.stderr, mininterval=5, leave=False)


# --- 1. inference latency --------------------------------------------------------------------
class PlainNet(nn.Module):
    """A hand-written plain network: 3x3 conv + ReLU per layer, global pool, linear.

    Args:
        convs: ``(in_channels, out_channels, stride)`` of each 3x3 layer.
        num_classes: outputs of the head.
    """

    def __init__(self, convs: list[tuple[int, int, int]], num_classes: int) -> None:
        super().__init__()
        layers = []
        for c_in, c_out, stride in convs:
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(convs[-1][1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


class NestedPlainNet(nn.Module):
    """The same layers with repsqueeze's model nesting (stem, stages of conv + ReLU units):
    what ``deploy(model, unwrap=True)`` holds, written with torch modules only.

    Args:
        stages: per stage, ``(in_channels, out_channels, stride)`` of each unit.
        num_classes: outputs of the head.
    """

    def __init__(self, stages: list[list[tuple[int, int, int]]], num_classes: int) -> None:
        super().__init__()

        def unit(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU(inplace=True))

        stem, *rest = stages
        self.stem = nn.Sequential(*(unit(*u) for u in stem))
        self.stages = nn.Sequential(*(nn.Sequential(*(unit(*u) for u in s)) for s in rest))
        self.head = nn.Linear(rest[-1][-1][1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(self.stages(x).flatten(2).mean(-1))


def _shapes(convs: list[nn.Conv2d]) -> list[tuple[int, int, int]]:
    return [(m.in_channels, m.out_channels, m.stride[0]) for m in convs]


@torch.no_grad()
def plain_twins(unwrapped: nn.Module, num_classes: int) -> tuple[PlainNet, NestedPlainNet]:
    """Hand-written networks with the layers of ``deploy(model, unwrap=True)`` (flat and with
    the model's nesting), holding the same weights: the same arithmetic on the same values."""
    convs = [m for m in unwrapped.modules() if isinstance(m, nn.Conv2d)]
    stages = [[m for m in s.modules() if isinstance(m, nn.Conv2d)] for s in unwrapped.stages]
    stem = [m for m in unwrapped.stem.modules() if isinstance(m, nn.Conv2d)]
    nested = NestedPlainNet([_shapes(stem), *map(_shapes, stages)], num_classes)
    nested.load_state_dict(unwrapped.state_dict(), strict=True)
    flat = PlainNet(_shapes(convs), num_classes)
    twins = [m for m in flat.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    originals = [m for m in unwrapped.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for twin, original in zip(twins, originals, strict=True):
        twin.load_state_dict(original.state_dict())
    return flat, nested


def module_calls(model: nn.Module, x: torch.Tensor) -> int:
    """``nn.Module`` calls in one forward: each costs a few microseconds of Python on the
    host, which a launch-bound GPU forward pays on top of identical kernels."""
    calls = [0]

    def count(module: nn.Module, args: tuple) -> None:
        calls[0] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        model(x)
    finally:
        handle.remove()
    return calls[0]


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object] | None:
    """``fn`` captured once into a CUDA graph; the returned function replays it (``None``
    when ``fn`` cannot be captured, e.g. it synchronises with the host)."""
    try:
        return _capture(fn)
    except RuntimeError as err:
        print(f"CUDA graph capture failed: {err}", file=sys.stderr)
        return None


def _capture(fn: Callable[[], object]) -> Callable[[], object]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.no_grad()
def bench_latency(args: argparse.Namespace) -> list[dict]:
    size224 = 64 if args.quick else 224
    cases = [
        ("repvgg_a0", {"num_classes": 1000}, size224),
        ("repvgg_a0 (CIFAR stem)", {"num_classes": 10, "cifar_stem": True}, 32),
    ]
    cuda = args.device.startswith("cuda")
    rows = []
    for label, kw, size in cases:
        model = randomize_bn(create_model("repvgg_a0", block="repvgg", **kw)).eval()
        unwrapped = rs.deploy(model, unwrap=True)
        flat, nested = plain_twins(unwrapped, kw["num_classes"])
        forms = {
            "training form": model,
            "deployed": rs.deploy(model),
            "deployed, unwrap=True": unwrapped,
            PLAIN: flat.eval(),
            f"{PLAIN} (model's nesting)": nested.eval(),
        }
        if label == "repvgg_a0" and _has_timm():
            import timm
            from timm.utils import reparameterize_model

            forms["timm repvgg_a0 (reparameterized)"] = reparameterize_model(
                timm.create_model("repvgg_a0", pretrained=False)
            ).eval()
        forms = {k: m.to(args.device) for k, m in forms.items()}
        for batch in (1, 4 if args.quick else 32):
            x = torch.randn(batch, 3, size, size, device=args.device)
            calls = {k: module_calls(m, x) for k, m in forms.items()}
            rounds = args.repeats if batch == 1 else max(3, args.repeats // 4)
            fns = {k: (lambda m=m, x=x: m(x)) for k, m in forms.items()}
            times = interleaved(fns, rounds, block_s=0.05 if cuda else 0.0)
            replays = {k: cuda_graph(f) for k, f in fns.items()} if cuda else {}
            graphs = interleaved({k: f for k, f in replays.items() if f is not None}, rounds)
            base = times[PLAIN].median
            for name, m in times.items():
                ms, iqr = _ms(m)
                row = {
                    "model": f"{label} {size}x{size}",
                    "batch": batch,
                    "form": name,
                    "ms": ms,
                    "iqr ms": iqr,
                    "vs plain": m.median / base,
                    "module calls": calls[name],
                }
                if cuda:
                    graph, plain = graphs.get(name), graphs.get(PLAIN)
                    row["graph ms"] = graph.median * 1e3 if graph else None
                    row["graph vs plain"] = graph.median / plain.median if graph and plain else None
                row["params"] = count_params(forms[name])
                rows.append(row)
    return rows


def _has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


# --- 2. training step --------------------------------------------------------------------------
def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training step,
    parameters excluded (they are held anyway): the activation memory of training."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


Builder = Callable[[], nn.Module]


def training_variants(model_name: str, quick: bool, gpu: bool) -> dict[str, Builder]:
    """Label -> builder of the network, for the training-step comparison.

    Chain and online form of every block kind (online with the OREPA-style norm, one
    BatchNorm after the block, except ExpandNets blocks, which fold without it), DBB's chain
    also with recomputation, each followed by the peers' blocks it compares with on the same
    network (:mod:`peers`: the official DBB, OREPA and ACB blocks from fetched copies of their
    repositories, timm's RepVGG and MobileOne blocks); on the GPU also timm's ``repvgg_a0``
    training form and the hand-written OREPA-style floor.
    """
    num_classes = 1000 if gpu else 10

    def build(kind: str, mode: str, recompute: bool | None = None, **kw) -> Builder:
        return lambda: rs.set_mode(
            create_model(model_name, block=kind, num_classes=num_classes, **kw), mode, recompute
        )

    found, notes = peers.peer_variants(model_name, num_classes)
    NOTES["training"] = notes
    variants = {"plain (ConvBN)": build("plain", "chain")}
    kinds = [k for k in KINDS if k != "plain"]
    if not gpu:
        kinds = ["expand_ck", "expand_cl", "dbb", "repvgg", "acb", "mobileone"]
    for kind in kinds:
        kw = {"expansion": 4} if kind.startswith("expand") else {}
        variants[f"{kind} chain"] = build(kind, "chain", **kw)
        if kind == "dbb":
            variants["dbb chain, recompute"] = build(kind, "chain", recompute=True)
        if kind.startswith("expand"):
            variants[f"{kind} online"] = build(kind, "online", **kw)
        else:
            variants[f"{kind} online (OREPA-style norm)"] = build(kind, "online", online_norm=True)
        variants.update(found.get(kind, {}))
    if gpu:
        if _has_timm():
            import timm

            variants["timm repvgg_a0 training form"] = lambda: timm.create_model("repvgg_a0")
        variants["floor: hand-written OREPA-style"] = lambda: floor.FloorRepVGG(num_classes)
    if quick:
        keep = ["plain (ConvBN)", "repvgg chain", "repvgg online (OREPA-style norm)"]
        keep += ["expand_ck chain", "expand_ck online"]  # the largest chain/online gap
        keep += ["dbb chain, recompute", "timm RepVggBlock"]
        variants = {k: variants[k] for k in keep if k in variants}
    return variants


COMPILED = {
    "compiled plain": "plain (ConvBN)",
    "compiled repvgg online": "repvgg online (OREPA-style norm)",
}


def _step_fn(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None
) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    device = x.device.type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        mixed = torch.autocast(device, autocast) if autocast else contextlib.nullcontext()
        with mixed:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def bench_training(args: argparse.Namespace) -> list[dict]:
    if args.device.startswith("cuda"):
        return bench_training_cuda(args)
    batch, size = (8, 16) if args.quick else (64, 32)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    steps, memory, params = {}, {}, {}
    for label, build in training_variants("resnet20_cifar", args.quick, gpu=False).items():
        torch.manual_seed(0)
        model = build().train()
        steps[label] = _step_fn(model, x, y, None)
        memory[label] = saved_activation_bytes(model, x, y)
        params[label] = count_params(model)
    times = interleaved(steps, max(3, args.repeats // 2), block_s=0.0)
    base = "plain (ConvBN)"
    rows = []
    for k, m in times.items():
        ms, iqr = _ms(m)
        rows.append(
            {
                "variant": k,
                "step ms": ms,
                "iqr ms": iqr,
                "time vs plain": m.median / times[base].median,
                "ratio IQR": _ratio_spread(m, times[base]),
                "activations MiB": memory[k] / 2**20,
                "memory vs plain": memory[k] / memory[base],
                "params": params[k],
            }
        )
    return rows


def _ratio_spread(m: Measurement, base: Measurement) -> str:
    """Interquartile range of the per-round ratios ``m / base`` (each round times every
    variant once, so a ratio within a round is immune to drift across rounds)."""
    ratios = sorted(a / b for a, b in zip(m.times, base.times, strict=True))
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return f"{q1:.2f}-{q3:.2f}"


def bench_training_cuda(args: argparse.Namespace) -> list[dict]:
    """repvgg_a0 224x224 on the GPU: every variant at every (precision, batch), interleaved."""
    size = 64 if args.quick else 224
    batches = (8,) if args.quick else tuple(args.batches)
    variants = training_variants("repvgg_a0", args.quick, gpu=True)
    rows = []
    for precision in ("fp32", "bf16"):
        autocast = torch.bfloat16 if precision == "bf16" else None
        for batch in batches:
            x = torch.randn(batch, 3, size, size, device=args.device)
            y = torch.randint(0, 1000, (batch,), device=args.device)
            steps, peak, models = {}, {}, {}
            labels = [
                *variants,
                *(
                    COMPILED
                    if args.compile
                    and batch in args.compile_batches
                    and precision in args.compile_precisions
                    else ()
                ),
            ]
            for label in _progress(labels, f"training {precision} b{batch}"):
                torch.manual_seed(0)
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                try:
                    model = variants[COMPILED.get(label, label)]().to(args.device).train()
                    models[label] = model
                    if label in COMPILED:
                        model = torch.compile(model)
                    step = _step_fn(model, x, y, autocast)
                    step()  # compiles, autotunes, creates the optimizer state
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    step()
                    torch.cuda.synchronize()
                except torch.cuda.OutOfMemoryError:
                    models.pop(label, None)
                    peak[label] = None
                    torch.cuda.empty_cache()
                    continue
                peak[label] = torch.cuda.max_memory_allocated() - base
                steps[label] = step
            times = interleaved(steps, max(3, args.repeats // 4), block_s=0.1)
            plain = "plain (ConvBN)"
            for label in labels:
                m = times.get(label)
                ms, iqr = _ms(m) if m else (None, None)
                ref = times[plain].median
                rows.append(
                    {
                        "precision": precision,
                        "batch": batch,
                        "variant": label,
                        "step ms": ms,
                        "iqr ms": iqr,
                        "time vs plain": m.median / ref if m else None,
                        "peak MiB": peak[label] / 2**20 if peak[label] is not None else None,
                        "memory vs plain": peak[label] / peak[plain] if peak[label] else None,
                        "params": count_params(models[label]) if label in models else None,
                    }
                )
            del steps, models
            torch.cuda.empty_cache()
    return rows


# --- 3. squeeze time ---------------------------------------------------------------------------
def bench_squeeze(args: argparse.Namespace) -> list[dict]:
    name = "repvgg_a0" if args.quick else "repvgg_b0"
    rows = []
    for kind in ("repvgg", "dbb") if not args.quick else ("repvgg",):
        model = randomize_bn(create_model(name, block=kind, num_classes=1000)).eval()
        blocks = sum(isinstance(m, rs.Squeezable) for m in model.modules())
        times = []
        for _ in range(1 if args.quick else 3):
            fresh = copy.deepcopy(model)
            start = time.perf_counter()
            rs.deploy(fresh, inplace=True)
            times.append(time.perf_counter() - start)
        rows.append(
            {"model": name, "block": kind, "blocks": blocks, "squeeze s": statistics.median(times)}
        )
    return rows


# --- 4. exactness ----------------------------------------------------------------------------
def bench_exactness(args: argparse.Namespace) -> list[dict]:
    size = 16 if args.quick else 33  # odd: borders and strides do not line up
    rows = []
    for kind in _progress(KINDS, "exactness"):
        model = randomize_bn(
            create_model("resnet20_cifar", block=kind, num_classes=10), seed=1
        ).eval()
        x = torch.randn(4, 3, size, size)
        m64 = copy.deepcopy(model).double()
        rows.append(
            {
                "block": kind,
                "float64": relative_error(m64, rs.deploy(m64), x, torch.float64),
                "float32": relative_error(model, rs.deploy(model), x, torch.float32),
            }
        )
    return rows


# --- 5. accuracy on digits ---------------------------------------------------------------------
def bench_accuracy(args: argparse.Namespace) -> list[dict]:
    from repsqueeze.training.datamodules import DigitsDataModule

    data = DigitsDataModule(batch_size=64)
    data.setup()
    epochs = 1 if args.quick else 8
    kinds = KINDS[:2] if args.quick else KINDS
    rows = []
    for kind in _progress(kinds, "accuracy"):
        accs, deployed_accs = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = create_model("digits_net", block=kind, num_classes=10, in_channels=1)
            _fit(model, data, epochs)
            accs.append(_accuracy(model, data))
            deployed_accs.append(_accuracy(rs.deploy(model), data))
        rows.append(
            {
                "block": kind,
                "params (train)": count_params(model),
                "params (deployed)": count_params(rs.deploy(model)),
                "test acc mean": statistics.mean(accs),
                "test acc std": statistics.pstdev(accs),
                "deployed == training": accs == deployed_accs,
            }
        )
    return rows


def _fit(model: nn.Module, data, epochs: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, 3e-3, total_steps=epochs * len(data.train_dataloader())
    )
    model.train()
    for _ in range(epochs):
        for x, y in data.train_dataloader():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, data) -> float:
    model.eval()
    hits = total = 0
    for x, y in data.test_dataloader():
        hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return hits / total


# --- output ----------------------------------------------------------------------------------
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


def environment(args: argparse.Namespace) -> dict:
    cuda = args.device.startswith("cuda")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "quick": args.quick,
        # the script run from the command line (run.py, int8.py); None when called as a library
        "command": " ".join(["python", *sys.argv]) if sys.argv[0].endswith(".py") else None,
    }


def default_out(device: str, quick: bool) -> Path:
    """``benchmarks/results[_cuda]``; quick runs go to a temporary folder, never over the
    committed results."""
    name = "results_cuda" if device.startswith("cuda") else "results"
    root = Path(tempfile.gettempdir()) / "repsqueeze-bench-quick" if quick else HERE
    return root / name


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--only", default=None, help="comma-separated sections")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (pinned)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=20, help="timing rounds (sections scale it)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batches", default="64,256", help="GPU training batch sizes")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compiled rows in the GPU training table (default: on with CUDA)")  # fmt: skip
    parser.add_argument("--compile-batches", default="64", help="batch sizes of compiled rows")
    parser.add_argument("--compile-precisions", default="fp32", help="precisions of compiled rows")
    parser.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.backends.cudnn.benchmark (autotuned algorithms; all variants alike)")  # fmt: skip
    parser.add_argument("--out", default=None, help="writes OUT.md, OUT.json and OUT_*.png")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other sections of an existing OUT.json (each with the settings it ran under) and rewrite OUT.md from all of them")  # fmt: skip
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the PNGs of benchmarks/results*.json (or --out) and exit")  # fmt: skip
    parser.add_argument("--deploy-time", action="store_true",
                        help="the deploy-time table alone (deploy_time.py): results_deploy.{md,json}")  # fmt: skip
    args = parser.parse_args(argv)
    if args.deploy_time:
        import deploy_time

        out = ["--out", args.out] if args.out else []
        return deploy_time.main(["--quick"] * args.quick + out)
    if args.plot_only:
        outs = [Path(args.out)] if args.out else [HERE / "results", HERE / "results_cuda"]
        for out in outs:
            if out.with_suffix(".json").is_file():
                for png in plot(json.loads(out.with_suffix(".json").read_text()), out):
                    print(png)
        return {}
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.compile_batches = [int(b) for b in args.compile_batches.split(",")]
    args.compile = cuda if args.compile is None else args.compile
    args.compile_precisions = args.compile_precisions.split(",")
    if cuda:
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    only = args.only.split(",") if args.only else DEFAULT_SECTIONS["cuda" if cuda else "cpu"]
    unknown = [k for k in only if k not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    if args.quick:
        args.repeats, args.seeds = min(args.repeats, 3), min(args.seeds, 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    results = {"environment": environment(args)}
    env = results["environment"]
    where = (
        f"GPU: {env['gpu']}, TF32 {'on' if env['tf32'] else 'off'} (PyTorch default)"
        if cuda
        else f"CPU only, {args.threads} threads"
    )
    command = env["command"] or "benchmarks.run.main()"
    md = [f"# repsqueeze benchmarks\n\n`{command}`; torch {torch.__version__}; {where}.\n"]
    out = Path(args.out) if args.out else default_out(args.device, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    chunks = {}  # section -> its markdown
    if args.merge:
        env["kept"], kept_rows, chunks = _kept_sections(out, only)
        results.update(kept_rows)
    for key in only:
        start = time.perf_counter()
        rows = SECTIONS[key][1](args)
        results[key] = rows
        notes = NOTES.pop(key, [])
        if notes:
            results.setdefault("notes", {})[key] = notes
        chunks[key] = f"\n## {_title(key, args)}\n\n{table(rows)}\n{_notes(notes)}"
        print(f"[{key}] {time.perf_counter() - start:.1f} s", file=sys.stderr)
        env["seconds"] = round(time.perf_counter() - started, 1)
        md[1:] = [chunks[k] for k in sorted(chunks, key=list(SECTIONS).index)]
        _write(results, md, out)  # after every section: a run cut short keeps what it measured
    pngs = plot(results, out)
    print("".join(md))
    print(f"wrote {out}.md, {out}.json, {', '.join(map(str, pngs))}", file=sys.stderr)
    return results


def _notes(notes: list[str]) -> str:
    return "".join(f"\n_{note}_\n" for note in notes)


def _kept_sections(out: Path, rerun: list[str]) -> tuple[dict, dict, dict]:
    """``--merge``: the sections of ``OUT.json`` not rerun now.

    Returns:
        Per kept section its settings (environment, title, notes), its rows, and its
        markdown (the title, a line saying when and how it ran, the table).
    """
    path = out.with_suffix(".json")
    old = json.loads(path.read_text()) if path.is_file() else {}
    env = old.get("environment", {})
    settings = {k: v for k, v in env.items() if k not in ("kept", "seconds")}
    kept, rows, chunks = {}, {}, {}
    for key in SECTIONS:
        if key not in old or key in rerun:
            continue
        previous = env.get("kept", {}).get(key, {})
        kept[key] = {
            "environment": previous.get("environment", settings),
            "title": previous.get("title") or _markdown_title(path, key),
            "notes": previous.get("notes", old.get("notes", {}).get(key, [])),
        }
        rows[key] = old[key]
        ran = kept[key]["environment"]
        when = f"{ran.get('threads')} threads, {ran.get('date')}, `{ran.get('command')}`"
        chunks[key] = (
            f"\n## {kept[key]['title']}\n\n_Kept from an earlier run ({when})._\n\n"
            f"{table(old[key])}\n{_notes(kept[key]['notes'])}"
        )
    return kept, rows, chunks


def _markdown_title(json_path: Path, key: str) -> str:
    """The heading a section had in the markdown file written with the JSON."""
    md = json_path.with_suffix(".md")
    lines = md.read_text().splitlines() if md.is_file() else []
    prefix = f"## {SECTIONS[key][0]}"
    return next((line[3:] for line in lines if line.startswith(prefix)), SECTIONS[key][0])


def _write(results: dict, md: list[str], out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(_finite(results), indent=2, allow_nan=False))
    out.with_suffix(".md").write_text("".join(md))


def _finite(v: object) -> object:
    """Strict JSON: non-finite figures become strings ("nan", "inf")."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


# --- pictures --------------------------------------------------------------------------------
def plot(results: dict, out: Path) -> list[Path]:
    """PNG charts next to ``out``: ``OUT_training.png`` (time and memory vs plain per
    variant) and ``OUT_latency.png`` (each form vs the hand-written plain network)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no charts (pip install -e .[dev])", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = results.get("environment", {})
    where = env.get("gpu") or f"CPU, {env.get('threads', '?')} threads"
    written = []
    training = [r for r in results.get("training", []) if _number(r.get("time vs plain"))]
    if training:
        groups = sorted({(r.get("precision", "fp32"), r.get("batch", 64)) for r in training})
        variants = list(dict.fromkeys(r["variant"] for r in training))
        fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(variants) * len(groups) ** 0.5 + 2))
        for ax, key, name in zip(axes, ("time vs plain", "memory vs plain"), ("step time", "memory"), strict=True):  # fmt: skip
            _bars(ax, training, variants, groups, key)
            ax.set_title(f"Training {name} / plain ({where})")
        fig.tight_layout()
        written.append(_save(fig, out, "training"))
    latency = [r for r in results.get("latency", []) if _number(r.get("vs plain"))]
    if latency:
        forms = list(dict.fromkeys(r["form"] for r in latency))
        groups = list(dict.fromkeys((r["model"], r["batch"]) for r in latency))
        fig, ax = plt.subplots(figsize=(11, 0.35 * len(forms) * len(groups) ** 0.5 + 2))
        rows = [{**r, "variant": r["form"], "precision": r["model"]} for r in latency]
        _bars(ax, rows, forms, groups, "vs plain")
        ax.set_title(f"Inference latency / hand-written plain ({where})")
        fig.tight_layout()
        written.append(_save(fig, out, "latency"))
    plt.close("all")
    return written


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bars(ax, rows: list[dict], variants: list[str], groups: list, key: str) -> None:
    """Horizontal bars, labelled with their value: one row per variant, one bar per group
    ``(precision or model, batch)``, a line at 1 (plain); log scale when ratios span > 3x."""
    from matplotlib.ticker import FuncFormatter

    height = 0.8 / len(groups)
    top = 1.0
    for g, group in enumerate(groups):
        values = {
            r["variant"]: r[key]
            for r in rows
            if (r.get("precision", "fp32"), r.get("batch", 64)) == group and _number(r.get(key))
        }
        ys = [i + g * height for i, v in enumerate(variants) if v in values]
        label = f"{group[0]}, batch {group[1]}"
        bars = ax.barh(ys, [values[v] for v in variants if v in values], height, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        top = max(top, *values.values()) if values else top
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(variants))], variants)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    if top > 3:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlim(right=top * (1.5 if top > 3 else 1.12))
    ax.set_xlabel("ratio to plain" + (" (log scale)" if top > 3 else ""))
    if len(groups) > 1:
        ax.legend(fontsize="small", loc="lower right")


def _save(fig, out: Path, name: str) -> Path:
    path = out.parent / f"{out.name}_{name}.png"
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
