"""The command-line probes: every bad setting and broken run that ``benchmarks/cli_probes.py``
puts to ``train.py`` and ``deploy.py``, each with what a clear answer is."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import probe_setups as s
from benchmarks.probe_setups import SHORT


@dataclass
class Probe:
    """``script overrides`` run in a fresh folder ``tmp``; ``fails``: a refusal is right;
    ``check(tmp, result)``: for runs that should work, whether their outcome is right;
    ``setup(tmp, root)``: returns extra overrides (files it made)."""

    name: str
    script: str
    overrides: list[str]
    fails: bool = True
    check: Callable[[Path, subprocess.CompletedProcess], bool] | None = None
    setup: Callable[[Path, Path], list[str]] | None = None
    root_only: bool = False
    signal_after: float | None = None  # send SIGTERM after this many seconds
    user_file: str | None = None  # a file (relative to tmp) that must survive
    flags: list[str] = field(default_factory=list)
    names: str | None = None  # what a clear refusal names; default: the last override's key


def train(name: str, overrides: list[str], **kw) -> Probe:
    """A probe of ``train.py``."""
    return Probe(name, "train.py", overrides, **kw)


def deploy(name: str, overrides: list[str], **kw) -> Probe:
    """A probe of ``deploy.py``, on a checkpoint of a RepVGG digits net unless ``setup``
    makes another input."""
    return Probe(name, "deploy.py", overrides, **{"setup": s.ckpt("repvgg"), **kw})


TRAIN = [
    train("train max_epochs=abc", ["trainer.max_epochs=abc"]),
    train("train seed=abc", ["seed=abc"]),
    train("train label_smoothing=2", ["model.label_smoothing=2"]),
    train("train deploy_tolerance=-1", [*SHORT, "model.deploy_tolerance=-1"]),
    train("train ckpt_path=deployed.pt", SHORT, setup=s.deployed),
    train("train ckpt_path=truncated", SHORT, setup=s.truncated),
    train("train ckpt_path=pickle", SHORT, setup=s.pickle),
    train("train ckpt_path=other block", SHORT, setup=s.ckpt("dbb")),
    train(
        "train precision=64",
        [*SHORT, "trainer.precision=64"],
        fails=False,
        check=s.precision64,
    ),
    train("train mode=online dbb", [*SHORT, "model.mode=online", "model.net.block=dbb"]),
    train(
        "train mode=online qarepvgg",
        [*SHORT, "model.mode=online", "model.net.block=qarepvgg"],
    ),
    train(
        "train trainer=ddp on CPU",
        [*SHORT, "trainer=ddp"],
        check=s.no_half_folder,
        names="ddp",
    ),
    train("train optimizer.lr=0", [*SHORT, "optimizer.lr=0"]),
    train(
        "train imagefolder val_fraction=0",
        [*SHORT, "data=imagefolder", "data.val_fraction=0"],
        setup=s.images,
    ),
    train("train devices=abc", ["trainer.devices=abc"]),
    train("train accelerator=tpu", ["trainer.accelerator=tpu"]),
    train("train precision=7", ["trainer.precision=7"]),
    train("train data.batch_size=abc", ["data.batch_size=abc"]),
    train("train val_fraction=1.5", ["data.val_fraction=1.5"]),
    train("train check_val_every_n_epoch=0", ["trainer.check_val_every_n_epoch=0"]),
    train("train log_every_n_steps=-1", ["trainer.log_every_n_steps=-1"]),
    train("train limit_val_batches=-1", ["trainer.limit_val_batches=-1"]),
    train("train weight_decay=abc", ["optimizer.weight_decay=abc"]),
    train("train sgd momentum=-1", ["optimizer=sgd", "optimizer.momentum=-1"]),
    train(
        "train scheduler step_size=0",
        [*SHORT, "scheduler=step", "scheduler.step_size=0"],
    ),
    train("train +trainer.foo=1", ["+trainer.foo=1"]),
    train("train model.compile=abc", [*SHORT, "model.compile=abc"]),
    train("train model.mode=fast", ["model.mode=fast"]),
    train("train test=maybe", [*SHORT, "test=maybe"]),
    train("train model.net.name=nope", ["model.net.name=nope"]),
    train(
        "train monitor=val/nope",
        [*SHORT, "callbacks.model_checkpoint.monitor=val/nope"],
        check=s.no_half_folder,
    ),
    train(
        "train min_epochs > max_epochs",
        ["trainer.min_epochs=9", "trainer.max_epochs=2"],
    ),
    train("train optimized_metric=val/nope", [*SHORT, "optimized_metric=val/nope"]),
    train("train num_workers=abc", ["data.num_workers=abc"]),
    train("train trainer=foo", ["trainer=foo"]),
    train("train max_epoch (typo)", ["trainer.max_epoch=3"]),
    train("train disk full", SHORT, setup=s.full_disk, root_only=True, names="space"),
    train(
        "train read-only run folder",
        SHORT,
        setup=s.read_only,
        root_only=True,
        names="write",
    ),
    train(
        "train failing run in a user folder",
        ["trainer.max_epochs=abc"],
        setup=s.user_folder,
        user_file="mine/notes.txt",
    ),
    train(
        "train last.ckpt every epoch",
        [*SHORT[1:], "trainer.max_epochs=3", "test=false", "deploy=false"],
        fails=False,
        check=s.last_is_last,
    ),
    train(
        "train resume=last in place",
        [
            *SHORT[1:],
            "trainer.max_epochs=4",
            "trainer.limit_train_batches=4",
            "ckpt_path=last",
            "test=false",
            "deploy=false",
        ],
        fails=False,
        setup=s.resume,
        check=s.resumed_in_place,
    ),
    train(
        "train SIGTERM",
        ["trainer.max_epochs=200", "callbacks.progress_bar.refresh_rate=0"],
        fails=False,
        signal_after=25,
        check=s.interrupted,
    ),
    train("train train.log", SHORT, fails=False, check=s.train_log),
    train(
        "train sweep first job fails",
        [*SHORT, "seed=abc,0"],
        flags=["-m"],
        fails=False,
        check=s.sweep_goes_on,
    ),
]


DEPLOY = [
    deploy(
        "deploy batch_size=0",
        ["batch_size=0"],
        names="batch_size",
    ),
    deploy(
        "deploy batch_size=-1",
        ["batch_size=-1"],
        names="batch_size",
    ),
    deploy(
        "deploy batch_size=abc",
        ["batch_size=abc"],
        names="batch_size",
    ),
    deploy(
        "deploy int8.calibration_batches=-2",
        ["int8.enabled=true", "data=digits", "int8.calibration_batches=-2"],
    ),
    deploy(
        "deploy formats.onnx_opset=7",
        ["formats.onnx_opset=7", "measure.enabled=false"],
    ),
    deploy(
        "deploy formats.onnx_opset=99",
        ["formats.onnx_opset=99", "measure.enabled=false"],
    ),
    deploy(
        "deploy +model.net.block",
        ["+model.net.block=dbb", "measure.enabled=false", "formats.onnx=false"],
    ),
    deploy(
        "deploy tol.float32=-1",
        ["tol.float32=-1"],
        names="tol.float32",
    ),
    deploy("deploy device=tpu", ["device=tpu"], names="device"),
    deploy("deploy seed=abc", ["seed=abc"], names="seed"),
    deploy(
        "deploy measure.min_run_time=0",
        ["measure.min_run_time=0", "formats.onnx=false"],
    ),
    deploy(
        "deploy int8.max_drop=2",
        ["int8.enabled=true", "data=digits", "int8.max_drop=2"],
    ),
    deploy(
        "deploy int8.calibration_method=foo",
        ["int8.enabled=true", "data=digits", "int8.calibration_method=foo"],
    ),
    deploy("deploy pt2=maybe", ["pt2=maybe"], names="pt2"),
    deploy("deploy input_shape=[1,0,8]", ["input_shape=[1,0,8]"]),
    deploy(
        "deploy disk full",
        ["measure.enabled=false"],
        setup=s.full_disk_deploy,
        root_only=True,
        names="space",
    ),
]
