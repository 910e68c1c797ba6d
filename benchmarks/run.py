"""Benchmarks of repsqueeze: one command, a markdown table and a JSON file.

    python benchmarks/run.py                 # full run, CPU (about 15 minutes on 2 cores)
    python benchmarks/run.py --quick         # tiny sizes: the CI smoke test
    python benchmarks/run.py --only latency,exactness

Every comparison runs side by side in this one process, interleaved, with a fixed number of
threads; timings are medians over many repetitions, reported with their ratios. Figures:

1. inference latency (batch 1 and 32): training form vs deployed vs a hand-written plain
   network of the same shapes (and timm's ``repvgg_a0`` after ``reparameterize_model``);
2. training step time and activation memory: plain vs chain mode vs online mode;
3. squeeze time of a whole RepVGG-B0;
4. exactness: largest relative error per block kind, float32 and float64;
5. accuracy on the embedded digits set per block kind, over several seeds.

With ``--device cuda`` the latency and training-step figures are timed on the GPU with CUDA
events; the default is the CPU. Memory is the bytes autograd saves for backward, which
is what over-parameterized training multiplies, on any device.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import repsqueeze as rs
from repsqueeze.export import count_params, relative_error
from repsqueeze.models import create_model
from repsqueeze.zoo import BLOCKS

KINDS = list(BLOCKS)


# --- timing ----------------------------------------------------------------------------------
def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu", warmup: int = 2
) -> dict[str, float]:
    """Median milliseconds of each function, timed in turn so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def _time_once(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


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


def plain_twin(deployed: nn.Module, num_classes: int) -> PlainNet:
    convs = [
        (m.in_channels, m.out_channels, m.stride[0])
        for m in deployed.modules()
        if isinstance(m, nn.Conv2d)
    ]
    return PlainNet(convs, num_classes)


@torch.no_grad()
def bench_latency(args: argparse.Namespace) -> list[dict]:
    size224 = 64 if args.quick else 224
    cases = [
        ("repvgg_a0", {"num_classes": 1000}, size224),
        ("repvgg_a0 (CIFAR stem)", {"num_classes": 10, "cifar_stem": True}, 32),
    ]
    rows = []
    for label, kw, size in cases:
        model = randomize_bn(create_model("repvgg_a0", block="repvgg", **kw)).eval()
        forms = {"training form": model, "deployed": rs.deploy(model), "hand-written plain": None}
        forms["hand-written plain"] = plain_twin(forms["deployed"], kw["num_classes"]).eval()
        if label == "repvgg_a0" and _has_timm():
            import timm
            from timm.utils import reparameterize_model

            forms["timm repvgg_a0 (reparameterized)"] = reparameterize_model(
                timm.create_model("repvgg_a0", pretrained=False)
            ).eval()
        forms = {k: m.to(args.device) for k, m in forms.items()}
        for batch in (1, 32):
            x = torch.randn(batch, 3, size, size, device=args.device)
            repeats = args.repeats if batch == 1 else max(3, args.repeats // 4)
            fns = {k: (lambda m=m, x=x: m(x)) for k, m in forms.items()}
            ms = interleaved_medians(fns, repeats, args.device)
            for name, t in ms.items():
                rows.append(
                    {
                        "model": f"{label} {size}x{size}",
                        "batch": batch,
                        "form": name,
                        "ms": t,
                        "vs plain": t / ms["hand-written plain"],
                        "params": count_params(forms[name]),
                    }
                )
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


def training_variants(quick: bool) -> list[tuple[str, str, dict, str]]:
    """``(label, block kind, block kwargs, mode)`` for the training-step comparison."""
    variants = [("plain (ConvBN)", "plain", {}, "chain")]
    for kind, kw in (
        ("expand_ck", {"expansion": 4}),
        ("expand_cl", {"expansion": 4}),
        ("dbb", {}),
        ("repvgg", {}),
    ):
        variants.append((f"{kind} chain", kind, kw, "chain"))
        online_kw = kw if kind.startswith("expand") else {**kw, "online_norm": True}
        suffix = "" if kind.startswith("expand") else " (OREPA-style norm)"
        variants.append((f"{kind} online{suffix}", kind, online_kw, "online"))
    return variants[:3] if quick else variants


def bench_training(args: argparse.Namespace) -> list[dict]:
    batch, size = (8, 16) if args.quick else (64, 32)
    x = torch.randn(batch, 3, size, size, device=args.device)
    y = torch.randint(0, 10, (batch,), device=args.device)
    steps: dict[str, Callable[[], object]] = {}
    memory: dict[str, int] = {}
    params: dict[str, int] = {}
    for label, kind, kw, mode in training_variants(args.quick):
        torch.manual_seed(0)
        model = create_model("resnet20_cifar", block=kind, num_classes=10, **kw)
        model = rs.set_mode(model, mode).to(args.device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        steps[label] = step
        memory[label] = saved_activation_bytes(model, x, y)
        params[label] = count_params(model)
    ms = interleaved_medians(steps, max(3, args.repeats // 2), args.device)
    base = "plain (ConvBN)"
    return [
        {
            "variant": k,
            "step ms": ms[k],
            "time vs plain": ms[k] / ms[base],
            "activations MiB": memory[k] / 2**20,
            "memory vs plain": memory[k] / memory[base],
            "params": params[k],
        }
        for k in steps
    ]


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
    for kind in KINDS:
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
    from repsqueeze.data import DigitsDataModule

    data = DigitsDataModule(batch_size=64)
    data.setup()
    epochs = 1 if args.quick else 8
    kinds = KINDS[:2] if args.quick else KINDS
    rows = []
    for kind in kinds:
        accs, deployed_accs = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = create_model("digits_net", block=kind, num_classes=10, in_channels=1)
            _fit(model, data, epochs, seed)
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


def _fit(model: nn.Module, data, epochs: int, seed: int) -> None:
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
SECTIONS = {
    "latency": ("Inference latency (ms, median)", bench_latency),
    "training": ("Training step on resnet20_cifar (batch 64, 32x32)", bench_training),
    "squeeze": ("Squeeze time", bench_squeeze),
    "exactness": ("Exactness: largest relative error, deployed vs training form", bench_exactness),
    "accuracy": ("Accuracy on the embedded digits set", bench_accuracy),
}


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v: object) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0 or (1e-3 <= abs(v) < 1e5):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.1f}"
        return f"{v:.1e}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def environment(args: argparse.Namespace) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "quick": args.quick,
        "command": " ".join(["python", *sys.argv]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (pinned)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (latency and training)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results", help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.seeds = min(args.repeats, 3), min(args.seeds, 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = {"environment": environment(args)}
    env = results["environment"]
    where = f"GPU: {env['gpu']}" if env["gpu"] else f"CPU only, {args.threads} threads"
    md = [f"# repsqueeze benchmarks\n\n`{env['command']}`; torch {torch.__version__}; {where}.\n"]
    for key in args.only.split(","):
        title, fn = SECTIONS[key]
        start = time.perf_counter()
        rows = fn(args)
        results[key] = rows
        md.append(f"\n## {title}\n\n{markdown_table(rows)}")
        print(f"[{key}] {time.perf_counter() - start:.1f} s", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(_finite(results), indent=2, allow_nan=False))
    out.with_suffix(".md").write_text("".join(md))
    print("".join(md))
    return results


def _finite(v: object) -> object:
    """Strict JSON: non-finite figures become strings ("nan", "inf")."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


if __name__ == "__main__":
    main()
