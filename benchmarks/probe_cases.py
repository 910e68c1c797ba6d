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


TRAIN = [
    Probe("train max_epochs=abc", "train.py", ["trainer.max_epochs=abc"]),
    Probe("train seed=abc", "train.py", ["seed=abc"]),
    Probe("train label_smoothing=2", "train.py", ["model.label_smoothing=2"]),
    Probe("train deploy_tolerance=-1", "train.py", [*SHORT, "model.deploy_tolerance=-1"]),
    Probe("train ckpt_path=deployed.pt", "train.py", SHORT, setup=s.deployed),
    Probe("train ckpt_path=truncated", "train.py", SHORT, setup=s.truncated),
    Probe("train ckpt_path=pickle", "train.py", SHORT, setup=s.pickle),
    Probe("train ckpt_path=other block", "train.py", SHORT, setup=s.ckpt("dbb")),
    Probe(
        "train precision=64",
        "train.py",
        [*SHORT, "trainer.precision=64"],
        fails=False,
        check=s.precision64,
    ),  # fmt: skip
    Probe(
        "train mode=online dbb", "train.py", [*SHORT, "model.mode=online", "model.net.block=dbb"]
    ),  # fmt: skip
    Probe(
        "train mode=online qarepvgg",
        "train.py",
        [*SHORT, "model.mode=online", "model.net.block=qarepvgg"],
    ),  # fmt: skip
    Probe(
        "train trainer=ddp on CPU",
        "train.py",
        [*SHORT, "trainer=ddp"],
        check=s.no_half_folder,
        names="ddp",
    ),
    Probe("train optimizer.lr=0", "train.py", [*SHORT, "optimizer.lr=0"]),
    Probe(
        "train imagefolder val_fraction=0",
        "train.py",
        [*SHORT, "data=imagefolder", "data.val_fraction=0"],
        setup=s.images,
    ),  # fmt: skip
    Probe("train devices=abc", "train.py", ["trainer.devices=abc"]),
    Probe("train accelerator=tpu", "train.py", ["trainer.accelerator=tpu"]),
    Probe("train precision=7", "train.py", ["trainer.precision=7"]),
    Probe("train data.batch_size=abc", "train.py", ["data.batch_size=abc"]),
    Probe("train val_fraction=1.5", "train.py", ["data.val_fraction=1.5"]),
    Probe("train check_val_every_n_epoch=0", "train.py", ["trainer.check_val_every_n_epoch=0"]),
    Probe("train log_every_n_steps=-1", "train.py", ["trainer.log_every_n_steps=-1"]),
    Probe("train limit_val_batches=-1", "train.py", ["trainer.limit_val_batches=-1"]),
    Probe("train weight_decay=abc", "train.py", ["optimizer.weight_decay=abc"]),
    Probe("train sgd momentum=-1", "train.py", ["optimizer=sgd", "optimizer.momentum=-1"]),
    Probe(
        "train scheduler step_size=0",
        "train.py",
        [*SHORT, "scheduler=step", "scheduler.step_size=0"],
    ),  # fmt: skip
    Probe("train +trainer.foo=1", "train.py", ["+trainer.foo=1"]),
    Probe("train model.compile=abc", "train.py", [*SHORT, "model.compile=abc"]),
    Probe("train model.mode=fast", "train.py", ["model.mode=fast"]),
    Probe("train test=maybe", "train.py", [*SHORT, "test=maybe"]),
    Probe("train model.net.name=nope", "train.py", ["model.net.name=nope"]),
    Probe(
        "train monitor=val/nope",
        "train.py",
        [*SHORT, "callbacks.model_checkpoint.monitor=val/nope"],
        check=s.no_half_folder,
    ),  # fmt: skip
    Probe(
        "train min_epochs > max_epochs",
        "train.py",
        ["trainer.min_epochs=9", "trainer.max_epochs=2"],
    ),  # fmt: skip
    Probe("train optimized_metric=val/nope", "train.py", [*SHORT, "optimized_metric=val/nope"]),
    Probe("train num_workers=abc", "train.py", ["data.num_workers=abc"]),
    Probe("train trainer=foo", "train.py", ["trainer=foo"]),
    Probe("train max_epoch (typo)", "train.py", ["trainer.max_epoch=3"]),
    Probe("train disk full", "train.py", SHORT, setup=s.full_disk, root_only=True, names="space"),
    Probe(
        "train read-only run folder",
        "train.py",
        SHORT,
        setup=s.read_only,
        root_only=True,
        names="write",
    ),
    Probe(
        "train failing run in a user folder",
        "train.py",
        ["trainer.max_epochs=abc"],
        setup=s.user_folder,
        user_file="mine/notes.txt",
    ),  # fmt: skip
    Probe(
        "train last.ckpt every epoch",
        "train.py",
        [*SHORT[1:], "trainer.max_epochs=3", "test=false", "deploy=false"],
        fails=False,
        check=s.last_is_last,
    ),  # fmt: skip
    Probe(
        "train resume=last in place",
        "train.py",
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
    ),  # fmt: skip
    Probe(
        "train SIGTERM",
        "train.py",
        ["trainer.max_epochs=200", "callbacks.progress_bar.refresh_rate=0"],
        fails=False,
        signal_after=25,
        check=s.interrupted,
    ),  # fmt: skip
    Probe("train train.log", "train.py", SHORT, fails=False, check=s.train_log),
    Probe(
        "train sweep first job fails",
        "train.py",
        [*SHORT, "seed=abc,0"],
        flags=["-m"],
        fails=False,
        check=s.sweep_goes_on,
    ),  # fmt: skip
]


DEPLOY = [
    Probe(
        "deploy batch_size=0",
        "deploy.py",
        ["batch_size=0"],
        setup=s.ckpt("repvgg"),
        names="batch_size",
    ),
    Probe(
        "deploy batch_size=-1",
        "deploy.py",
        ["batch_size=-1"],
        setup=s.ckpt("repvgg"),
        names="batch_size",
    ),
    Probe(
        "deploy batch_size=abc",
        "deploy.py",
        ["batch_size=abc"],
        setup=s.ckpt("repvgg"),
        names="batch_size",
    ),
    Probe(
        "deploy int8_calibration_batches=-2",
        "deploy.py",
        ["int8=true", "data=digits", "int8_calibration_batches=-2"],
        setup=s.ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy onnx_opset=7",
        "deploy.py",
        ["onnx_opset=7", "measure=false"],
        setup=s.ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy onnx_opset=99",
        "deploy.py",
        ["onnx_opset=99", "measure=false"],
        setup=s.ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy +model.net.block",
        "deploy.py",
        ["+model.net.block=dbb", "measure=false", "onnx=false"],
        setup=s.ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy tol_float32=-1",
        "deploy.py",
        ["tol_float32=-1"],
        setup=s.ckpt("repvgg"),
        names="tol_float32",
    ),
    Probe("deploy device=tpu", "deploy.py", ["device=tpu"], setup=s.ckpt("repvgg"), names="device"),
    Probe("deploy seed=abc", "deploy.py", ["seed=abc"], setup=s.ckpt("repvgg"), names="seed"),
    Probe(
        "deploy latency_min_run_time=0",
        "deploy.py",
        ["latency_min_run_time=0", "onnx=false"],
        setup=s.ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy int8_max_drop=2",
        "deploy.py",
        ["int8=true", "data=digits", "int8_max_drop=2"],
        setup=s.ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy int8_calibration_method=foo",
        "deploy.py",
        ["int8=true", "data=digits", "int8_calibration_method=foo"],
        setup=s.ckpt("repvgg"),
    ),  # fmt: skip
    Probe("deploy pt2=maybe", "deploy.py", ["pt2=maybe"], setup=s.ckpt("repvgg"), names="pt2"),
    Probe(
        "deploy input_shape=[1,0,8]", "deploy.py", ["input_shape=[1,0,8]"], setup=s.ckpt("repvgg")
    ),  # fmt: skip
    Probe(
        "deploy disk full",
        "deploy.py",
        ["measure=false"],
        setup=s.full_disk_deploy,
        root_only=True,
        names="space",
    ),  # fmt: skip
]
