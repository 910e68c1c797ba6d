"""What deploying costs and keeps: time to deploy a whole RepVGG, the largest relative error
of every block kind (float32 and float64), and accuracy on the embedded digits set (deployed
equal to training form)."""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import repsqueeze as rs
from benchmarks.common import KINDS, progress, randomize_bn
from repsqueeze import timing
from repsqueeze.export import count_params, relative_error
from repsqueeze.models import create_model
from repsqueeze.training.datamodules import DigitsDataModule


def bench_squeeze(args: argparse.Namespace) -> list[dict]:
    name = "repvgg_a0" if args.quick else "repvgg_b0"
    rows = []
    for kind in ("repvgg", "dbb") if not args.quick else ("repvgg",):
        model = randomize_bn(create_model(name, block=kind, num_classes=1000)).eval()
        blocks = sum(isinstance(m, rs.Squeezable) for m in model.modules())
        times = timing.interleaved_fresh(
            {kind: lambda m: rs.deploy(m, inplace=True)},
            {kind: lambda model=model: copy.deepcopy(model)},
            rounds=1 if args.quick else 3,
        )[kind]
        rows.append(
            {"model": name, "block": kind, "blocks": blocks, "squeeze s": statistics.median(times)}
        )
    return rows


def bench_exactness(args: argparse.Namespace) -> list[dict]:
    size = 16 if args.quick else 33  # odd: borders and strides do not line up
    rows = []
    for kind in progress(KINDS, "exactness"):
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


def bench_accuracy(args: argparse.Namespace) -> list[dict]:
    data = DigitsDataModule(batch_size=64)
    data.setup()
    epochs = 1 if args.quick else 8
    kinds = KINDS[:2] if args.quick else KINDS
    rows = []
    for kind in progress(kinds, "accuracy"):
        accs, deployed_accs = [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = create_model("digits_net", block=kind, num_classes=10, in_channels=1)
            fit(model, data, epochs)
            accs.append(accuracy(model, data))
            deployed_accs.append(accuracy(rs.deploy(model), data))
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


def fit(model: nn.Module, data, epochs: int) -> None:
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
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    hits = total = 0
    for x, y in data.test_dataloader():
        hits += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return hits / total
