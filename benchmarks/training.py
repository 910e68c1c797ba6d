"""One SGD training step per variant, timed interleaved, with the activation memory autograd
saves (CPU) or the peak GPU memory (CUDA): chain and online form of every block kind, DBB's
chain with recomputation, the peers' blocks (:mod:`benchmarks.peers`), on the GPU timm's
training form, the hand-written floor (:mod:`benchmarks.floor`) and compiled rows."""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Measurement

import repsqueeze as rs
from benchmarks import floor, peers
from benchmarks.common import KINDS, NOTES, has_timm, progress
from repsqueeze import timing
from repsqueeze.export import count_params
from repsqueeze.models import create_model


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
        if has_timm():
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
    times = timing.interleaved(steps, max(3, args.repeats // 2), block_s=0.0)
    base = "plain (ConvBN)"
    rows = []
    for k, m in times.items():
        ms, iqr = timing.ms(m)
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
            compiled = (
                args.compile
                and batch in args.compile_batches
                and precision in args.compile_precisions
            )
            labels = [*variants, *(COMPILED if compiled else ())]
            steps, peak, models = {}, {}, {}
            for label in progress(labels, f"training {precision} b{batch}"):
                models[label], steps[label], peak[label] = _cuda_step(
                    variants[COMPILED.get(label, label)], label in COMPILED, x, y, autocast
                )
            times = timing.interleaved(
                {k: f for k, f in steps.items() if f is not None},
                max(3, args.repeats // 4),
                block_s=0.1,
            )
            for label in labels:
                rows.append(_cuda_row(precision, batch, label, times, peak, models))
            del steps, models
            torch.cuda.empty_cache()
    return rows


def _cuda_step(
    build: Builder, compiled: bool, x: torch.Tensor, y: torch.Tensor, autocast: torch.dtype | None
) -> tuple[nn.Module | None, Callable[[], None] | None, int | None]:
    """``(model, step, peak bytes of a step above what was allocated before the model was
    built)``, or ``(None, None, None)`` when it runs out of GPU memory."""
    torch.manual_seed(0)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        model = build().to(x.device).train()
        step = _step_fn(torch.compile(model) if compiled else model, x, y, autocast)
        step()  # compiles, autotunes, creates the optimizer state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None, None
    return model, step, torch.cuda.max_memory_allocated() - base


def _cuda_row(
    precision: str,
    batch: int,
    label: str,
    times: dict[str, Measurement],
    peak: dict[str, int | None],
    models: dict[str, nn.Module | None],
) -> dict:
    plain = "plain (ConvBN)"
    m = times.get(label)
    ms, iqr = timing.ms(m) if m else (None, None)
    return {
        "precision": precision,
        "batch": batch,
        "variant": label,
        "step ms": ms,
        "iqr ms": iqr,
        "time vs plain": m.median / times[plain].median if m else None,
        "peak MiB": peak[label] / 2**20 if peak[label] is not None else None,
        "memory vs plain": peak[label] / peak[plain] if peak[label] else None,
        "params": count_params(models[label]) if models[label] is not None else None,
    }
