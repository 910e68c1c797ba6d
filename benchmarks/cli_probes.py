"""Probe both command lines with bad settings and broken runs; count how each one ends.

    python benchmarks/cli_probes.py                 # this checkout, all probes (about 10 min)
    python benchmarks/cli_probes.py --root DIR      # another checkout (e.g. an older commit)
    python benchmarks/cli_probes.py -k deploy       # only probes whose name contains "deploy"
    python benchmarks/cli_probes.py --start SIGTERM # from the first probe named ...SIGTERM...

Every probe runs ``python train.py ...`` or ``python deploy.py ...`` in a fresh folder, as a
user would, and is put in one class:

- ``clear``: what the probe expects (a refusal: exit status 1 and one line
  ``<script>: error: ...`` naming the setting or file, no traceback; a run that should work:
  exit 0 and its check holds);
- ``traceback``: a Python traceback, a crash (exit status other than 0 or 1), an error
  that is not one last line ``<script>: error: ...``, or a raw error that names neither the
  setting nor the file at fault;
- ``silent-wrong``: exit 0 where the run should fail, or a run whose check does not hold
  (``last.ckpt`` not the last epoch, best forgotten on resume, exit 0 after SIGTERM, ...);
- ``data-loss``: a file placed in the folder by the probe (a user's) is gone afterwards.

Disk-full and read-only probes mount small tmpfs folders and run only as root (else skipped).
Prints one row per probe and the totals; ``--json FILE`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SHORT = [
    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1", "callbacks.progress_bar.refresh_rate=0", "logger=none",
]  # fmt: skip


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


def _checkpoint(tmp: Path, root: Path, block: str = "repvgg", name: str = "net.ckpt") -> Path:
    """A train.py-style checkpoint of an untrained digits network, written in a subprocess."""
    path = tmp / name
    code = (
        "import sys, torch; from repsqueeze.training.lit import Classifier;"
        f"m = Classifier({{'name': 'digits_net', 'block': '{block}', 'num_classes': 10,"
        " 'in_channels': 1}); torch.save({'state_dict': m.state_dict(),"
        " 'hyper_parameters': dict(m.hparams), 'pytorch-lightning_version': '2.6'},"
        f" '{path}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(root), cwd=tmp)
    return path


def _deployed(tmp: Path, root: Path) -> list[str]:
    code = (
        "import torch; from repsqueeze import deploy, save_deployed, create_model;"
        "cfg = {'name': 'digits_net', 'block': 'repvgg', 'num_classes': 10, 'in_channels': 1};"
        f"save_deployed(deploy(create_model(**cfg)).eval(), '{tmp / 'deployed.pt'}', cfg)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(root), cwd=tmp)
    return [f"ckpt_path={tmp / 'deployed.pt'}"]


def _truncated(tmp: Path, root: Path) -> list[str]:
    path = _checkpoint(tmp, root)
    path.write_bytes(path.read_bytes()[:1000])
    return [f"ckpt_path={path}"]


def _pickle(tmp: Path, root: Path) -> list[str]:
    code = (
        "import torch, argparse; torch.save({'state_dict': argparse.Namespace(a=1)},"
        f" '{tmp / 'evil.ckpt'}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(root), cwd=tmp)
    return [f"ckpt_path={tmp / 'evil.ckpt'}"]


def _ckpt(block: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, root: [f"ckpt_path={_checkpoint(tmp, root, block)}"]


def _images(tmp: Path, root: Path) -> list[str]:
    code = (
        "import numpy as np, pathlib; from PIL import Image; r = np.random.default_rng(0)\n"
        "for c in ('ant', 'bee'):\n"
        f"    d = pathlib.Path('{tmp}/images') / c; d.mkdir(parents=True)\n"
        "    for i in range(6): Image.fromarray(r.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f'{i}.png')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(root), cwd=tmp)
    return [f"data.root={tmp / 'images'}", "data.image_size=8", "data.num_workers=0"]


def _mount(tmp: Path, options: str) -> Path:
    folder = tmp / "mnt"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    return folder


def _full_disk(tmp: Path, root: Path) -> list[str]:
    folder = _mount(tmp, "size=400k")
    return [f"paths.log_dir={folder}", f"hydra.run.dir={folder}/run"]


def _full_disk_deploy(tmp: Path, root: Path) -> list[str]:
    path = _checkpoint(tmp, root)
    folder = _mount(tmp, "size=300k")
    return [f"ckpt_path={path}", f"output_dir={folder}/out"]


def _read_only(tmp: Path, root: Path) -> list[str]:
    folder = _mount(tmp, "size=1m")
    (folder / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return [f"hydra.run.dir={folder}/run"]


def _user_folder(tmp: Path, root: Path) -> list[str]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine")
    return [f"hydra.run.dir={tmp / 'mine'}"]


def _metrics(tmp: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in tmp.glob("logs/**/metrics.json")]


def _last_is_last(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    import torch

    (last,) = tmp.glob("logs/**/last.ckpt")
    return torch.load(last, weights_only=True, map_location="cpu")["epoch"] == 2


def _precision64(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    return any("latency_ms_deployed" in m for m in _metrics(tmp))


def _interrupted(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    metrics = _metrics(tmp)
    saved = list(tmp.glob("logs/**/last.ckpt"))
    return result.returncode != 0 and bool(saved) and any(m.get("status") for m in metrics)


def _train_log(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    (log,) = tmp.glob("logs/**/train.log")
    text = log.read_text()
    return "Deploy check" in text and "GPU available" in text


def _sweep_goes_on(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    return result.returncode != 0 and len(_metrics(tmp)) >= 1


def _no_half_folder(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    """A failed run leaves no folder, or one that says it failed."""
    runs = [p for p in tmp.glob("logs/train/runs/*") if p.is_dir()]
    return result.returncode == 1 and all((r / "metrics.json").is_file() for r in runs)


def _resume(tmp: Path, root: Path) -> list[str]:
    """A first run of 3 epochs; the probe then resumes it to 4 epochs with ckpt_path=last."""
    first = [*SHORT[1:], "trainer.max_epochs=3", "trainer.limit_train_batches=4"]
    subprocess.run(
        [sys.executable, str(root / "train.py"), f"paths.root_dir={tmp}", *first, "test=false", "deploy=false"],  # fmt: skip
        cwd=tmp, env=_env(root), capture_output=True, check=True,
    )  # fmt: skip
    return []


def _resumed_in_place(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    import torch

    runs = [p for p in tmp.glob("logs/train/runs/*") if p.is_dir()]
    if result.returncode != 0 or len(runs) != 1:
        return False
    last = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    return last["epoch"] == 3 and last["global_step"] == 16


TRAIN = [
    Probe("train max_epochs=abc", "train.py", ["trainer.max_epochs=abc"]),
    Probe("train seed=abc", "train.py", ["seed=abc"]),
    Probe("train label_smoothing=2", "train.py", ["model.label_smoothing=2"]),
    Probe("train deploy_tolerance=-1", "train.py", [*SHORT, "model.deploy_tolerance=-1"]),
    Probe("train ckpt_path=deployed.pt", "train.py", SHORT, setup=_deployed),
    Probe("train ckpt_path=truncated", "train.py", SHORT, setup=_truncated),
    Probe("train ckpt_path=pickle", "train.py", SHORT, setup=_pickle),
    Probe("train ckpt_path=other block", "train.py", SHORT, setup=_ckpt("dbb")),
    Probe(
        "train precision=64",
        "train.py",
        [*SHORT, "trainer.precision=64"],
        fails=False,
        check=_precision64,
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
        check=_no_half_folder,
        names="ddp",
    ),
    Probe("train optimizer.lr=0", "train.py", [*SHORT, "optimizer.lr=0"]),
    Probe(
        "train imagefolder val_fraction=0",
        "train.py",
        [*SHORT, "data=imagefolder", "data.val_fraction=0"],
        setup=_images,
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
        check=_no_half_folder,
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
    Probe("train disk full", "train.py", SHORT, setup=_full_disk, root_only=True, names="space"),
    Probe(
        "train read-only run folder",
        "train.py",
        SHORT,
        setup=_read_only,
        root_only=True,
        names="write",
    ),
    Probe(
        "train failing run in a user folder",
        "train.py",
        ["trainer.max_epochs=abc"],
        setup=_user_folder,
        user_file="mine/notes.txt",
    ),  # fmt: skip
    Probe(
        "train last.ckpt every epoch",
        "train.py",
        [*SHORT[1:], "trainer.max_epochs=3", "test=false", "deploy=false"],
        fails=False,
        check=_last_is_last,
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
        setup=_resume,
        check=_resumed_in_place,
    ),  # fmt: skip
    Probe(
        "train SIGTERM",
        "train.py",
        ["trainer.max_epochs=200", "callbacks.progress_bar.refresh_rate=0"],
        fails=False,
        signal_after=25,
        check=_interrupted,
    ),  # fmt: skip
    Probe("train train.log", "train.py", SHORT, fails=False, check=_train_log),
    Probe(
        "train sweep first job fails",
        "train.py",
        [*SHORT, "seed=abc,0"],
        flags=["-m"],
        fails=False,
        check=_sweep_goes_on,
    ),  # fmt: skip
]
DEPLOY = [
    Probe(
        "deploy batch_size=0",
        "deploy.py",
        ["batch_size=0"],
        setup=_ckpt("repvgg"),
        names="batch_size",
    ),
    Probe(
        "deploy batch_size=-1",
        "deploy.py",
        ["batch_size=-1"],
        setup=_ckpt("repvgg"),
        names="batch_size",
    ),
    Probe(
        "deploy batch_size=abc",
        "deploy.py",
        ["batch_size=abc"],
        setup=_ckpt("repvgg"),
        names="batch_size",
    ),
    Probe(
        "deploy int8_calibration_batches=-2",
        "deploy.py",
        ["int8=true", "data=digits", "int8_calibration_batches=-2"],
        setup=_ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy onnx_opset=7", "deploy.py", ["onnx_opset=7", "measure=false"], setup=_ckpt("repvgg")
    ),  # fmt: skip
    Probe(
        "deploy onnx_opset=99",
        "deploy.py",
        ["onnx_opset=99", "measure=false"],
        setup=_ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy +model.net.block",
        "deploy.py",
        ["+model.net.block=dbb", "measure=false", "onnx=false"],
        setup=_ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy tol_float32=-1",
        "deploy.py",
        ["tol_float32=-1"],
        setup=_ckpt("repvgg"),
        names="tol_float32",
    ),
    Probe("deploy device=tpu", "deploy.py", ["device=tpu"], setup=_ckpt("repvgg"), names="device"),
    Probe("deploy seed=abc", "deploy.py", ["seed=abc"], setup=_ckpt("repvgg"), names="seed"),
    Probe(
        "deploy latency_min_run_time=0",
        "deploy.py",
        ["latency_min_run_time=0", "onnx=false"],
        setup=_ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy int8_max_drop=2",
        "deploy.py",
        ["int8=true", "data=digits", "int8_max_drop=2"],
        setup=_ckpt("repvgg"),
    ),  # fmt: skip
    Probe(
        "deploy int8_calibration_method=foo",
        "deploy.py",
        ["int8=true", "data=digits", "int8_calibration_method=foo"],
        setup=_ckpt("repvgg"),
    ),  # fmt: skip
    Probe("deploy pt2=maybe", "deploy.py", ["pt2=maybe"], setup=_ckpt("repvgg"), names="pt2"),
    Probe(
        "deploy input_shape=[1,0,8]", "deploy.py", ["input_shape=[1,0,8]"], setup=_ckpt("repvgg")
    ),  # fmt: skip
    Probe(
        "deploy disk full",
        "deploy.py",
        ["measure=false"],
        setup=_full_disk_deploy,
        root_only=True,
        names="space",
    ),  # fmt: skip
]


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "HYDRA_FULL_ERROR": "0"}


NEUTRAL = {"measure=false", "onnx=false", "test=false", "deploy=false", "data=digits", "int8=true"}


def _named(probe: Probe, extra: list[str]) -> str:
    """What a clear refusal must name: ``probe.names``, else the key of the first override
    that is the probe's own (not a shortening one), else of the setup's last (a file)."""
    if probe.names is not None:
        return probe.names
    own = [o for o in probe.overrides if o not in SHORT and o not in NEUTRAL]
    chosen = own[0] if own else extra[-1]
    return chosen.split("=", 1)[0].lstrip("+")


def classify(probe: Probe, tmp: Path, result: subprocess.CompletedProcess, extra: list[str]) -> str:
    out = (result.stdout + result.stderr).strip()
    if probe.user_file and not (tmp / probe.user_file).exists():
        return "data-loss"
    if result.returncode not in (0, 1) and probe.signal_after is None:
        return "traceback"
    if "Traceback (most recent call last)" in out:
        return "traceback"
    if probe.fails and result.returncode == 0:
        return "silent-wrong"
    if probe.check is not None:
        try:
            ok = probe.check(tmp, result)
        except (ValueError, OSError, KeyError):
            ok = False
        if not ok:
            return "silent-wrong"
    if result.returncode == 1 and probe.signal_after is None:
        errors = [i for i, line in enumerate(result.stderr.splitlines()) if ": error: " in line]
        lines = result.stderr.strip().splitlines()
        if not errors or errors[-1] != len(lines) - 1:  # a sweep: one line per failed job
            return "traceback"
        if probe.fails and _named(probe, extra) not in lines[-1]:
            return "traceback"
        return "clear" if probe.fails or probe.check is not None else "silent-wrong"
    return "clear"


def run_probe(probe: Probe, root: Path) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="probe-") as name:
        tmp = Path(name)
        mounted = []
        try:
            extra = probe.setup(tmp, root) if probe.setup else []
            mounted = [tmp / "mnt"] if (tmp / "mnt").is_dir() else []
            command = [sys.executable, str(root / probe.script), *probe.flags]
            if probe.script == "train.py":
                command.append(f"paths.root_dir={tmp}")
            elif not any(o.startswith(("input_shape=", "data=")) for o in probe.overrides):
                command.append("input_shape=[1,8,8]")
            command += [*probe.overrides, *extra]
            proc = subprocess.Popen(
                command, cwd=tmp, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            if probe.signal_after is not None:
                time.sleep(probe.signal_after)
                proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=600)
            result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
            verdict = classify(probe, tmp, result, extra)
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            return verdict, f"exit {result.returncode}: {lines[-1][:400] if lines else ''}"
        finally:
            for folder in mounted:
                subprocess.run(["umount", str(folder)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("-k", default="", help="only probes whose name contains this")
    parser.add_argument("--start", default="", help="skip the probes before the first whose name contains this")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the verdicts here")
    args = parser.parse_args()
    root = args.root.resolve()
    counts: Counter = Counter()
    verdicts = {}
    probes = TRAIN + DEPLOY
    first = next((i for i, p in enumerate(probes) if args.start in p.name), 0)
    for probe in probes[first:]:
        if args.k not in probe.name:
            continue
        if probe.root_only and os.geteuid() != 0:
            print(f"{'skipped':13} {probe.name} (needs root to mount tmpfs)")
            continue
        verdict, detail = run_probe(probe, root)
        counts[verdict] += 1
        verdicts[probe.name] = {"class": verdict, "detail": detail}
        print(f"{verdict:13} {probe.name:40} {detail}", flush=True)
    classes = ["clear", "traceback", "silent-wrong", "data-loss"]
    print("totals: " + ", ".join(f"{c} {counts[c]}" for c in classes))
    if args.json:
        args.json.write_text(json.dumps({"root": str(root), "probes": verdicts, "totals": counts}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
