"""Deployed inference latency (batch 1 and 32): training form, deployed, deployed with
``unwrap=True``, hand-written plain networks holding the same weights (flat, and with the
model's module nesting) and timm's reparameterized ``repvgg_a0``, timed interleaved; on CUDA
also the replay of a captured CUDA graph (kernel time alone)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
from torch import nn

import repsqueeze as rs
from benchmarks.common import PLAIN, has_timm, randomize_bn
from repsqueeze import timing
from repsqueeze.export import count_params
from repsqueeze.models import create_model


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
        if label == "repvgg_a0" and has_timm():
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
            times = timing.interleaved(fns, rounds, block_s=0.05 if cuda else 0.0)
            replays = {k: cuda_graph(f) for k, f in fns.items()} if cuda else {}
            graphs = timing.interleaved({k: f for k, f in replays.items() if f is not None}, rounds)
            base = times[PLAIN].median
            for name, m in times.items():
                ms, iqr = timing.ms(m)
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
