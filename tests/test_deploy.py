"""``deploy.py``: checkpoint in, verified deployed.pt / model.pt2 / ONNX / report out.

Fast tests call ``deploy.run(cfg)`` in-process on checkpoints written here from an untrained
network with randomized BatchNorm statistics (one per module; broken variants are copies of
it). ONNX export takes several seconds, so only the first test writes ``model.onnx``; the
others pass ``onnx=false``. The ``slow`` ones train digits for a few epochs with
``train(cfg)`` and run ``python deploy.py`` in a subprocess, as a user would.
"""

import dataclasses
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import load_script, randomize_bn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from torch import nn

import repsqueeze as rs
from repsqueeze import export, folders
from repsqueeze.cli.train import train
from repsqueeze.models import register_model, registry
from repsqueeze.training.lit import Classifier

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = {"deployed.pt", "model.pt2", "model.onnx", "report.json"}
NET_CONFIG = {"name": "digits_net", "block": "dbb", "num_classes": 10, "in_channels": 1}
REPVGG = {**NET_CONFIG, "block": "repvgg"}
TOL64, TOL32 = 1e-10, 1e-5
MEASURED = ["latency=true", "latency_min_run_time=0.01", "onnx=false"]
FAST = ["measure=false", "onnx=false"]

# One intra-op thread: several times faster for these tiny models on a busy 2-core machine.
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
]


deploy_script = load_script("deploy.py", "deploy_script")
DeployError = deploy_script.DeployError

Compose = Callable[..., DictConfig]


def deploy_test_plain_cnn(num_classes: int = 10, in_channels: int = 1, deployed: bool = False):
    """What ``rs.contract`` gives back: torch layers only, no re-parameterizable block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


@pytest.fixture
def plain_cnn_registered():
    """``deploy_test_plain_cnn`` in the model registry for one test (other tests check that
    every registered model is one of the library's)."""
    register_model(deploy_test_plain_cnn)
    yield
    registry._MODELS.pop("deploy_test_plain_cnn")


class CreatesMarker:
    """Pickles to ``open(marker, "w")``: unpickling it with code execution creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _no_outputs(out_dir: Path) -> None:
    """Nothing in the output folder and no staging folder left beside it."""
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert not list(out_dir.parent.glob(f"{folders.PREFIX}*"))


def _listing(out_dir: Path) -> set[str]:
    """The files of an export folder deploy.py made: its marker is there, and the rest."""
    names = {p.name for p in out_dir.iterdir()}
    assert folders.MARKER in names
    return names - {folders.MARKER}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _check_report(report: dict, inputs: set[str], files: set[str]) -> None:
    assert set(report["verification"]) == inputs
    for errors in report["verification"].values():
        assert 0 <= errors["float64"] <= TOL64
        assert 0 <= errors["float32"] <= TOL32
    assert set(report["checks"]) == files - {"report.json"}
    assert report["checks"]["deployed.pt"]["max_abs_diff"] == 0
    for name, check in report["checks"].items():
        assert check["relative_diff"] <= (1e-4 if name == "model.onnx" else 1e-5), name
    assert set(report["files"]) == files - {"report.json"}
    assert "TF32" in report["numerics"]
    m = report["measurements"]
    assert m["deployed"]["params"] < m["training"]["params"]
    assert m["deployed"]["macs_per_sample"] < m["training"]["macs_per_sample"]


def _write_checkpoint(path: Path, net_config: dict, seed: int = 0, edit=None) -> Path:
    """A Lightning-style checkpoint of an untrained network, BN statistics randomized;
    ``edit(state_dict)`` may break it first."""
    model = Classifier(net_config)
    randomize_bn(model.net, torch.Generator().manual_seed(seed))
    state = model.state_dict()
    if edit is not None:
        edit(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams)}, path)
    return path


# --- in-process: deploy.run(cfg) -----------------------------------------------------------
@pytest.fixture(scope="module")
def dbb_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dbb digits net (the richest block kind) in a run folder."""
    run_dir = tmp_path_factory.mktemp("run")
    return _write_checkpoint(run_dir / "checkpoints" / "model.ckpt", NET_CONFIG)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repvgg digits net in a run folder: cheaper, for the tests of everything else."""
    run_dir = tmp_path_factory.mktemp("run")
    return _write_checkpoint(run_dir / "checkpoints" / "model.ckpt", REPVGG)


@pytest.fixture(scope="module")
def checkpoint_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another network (plain ConvBN blocks, other statistics): export B of the
    replacement tests."""
    path = tmp_path_factory.mktemp("run_b") / "b.ckpt"
    return _write_checkpoint(path, {**NET_CONFIG, "block": "plain"}, seed=1)


@pytest.fixture
def compose_deploy(tmp_path: Path) -> Iterator[Compose]:
    """``compose_deploy(*overrides)``: the deploy config, writing only under ``tmp_path``."""
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
    paths = [f"paths.{key}={tmp_path}" for key in ("root_dir", "log_dir", "output_dir")]
    yield lambda *overrides: compose("deploy", overrides=[*paths, *overrides])
    GlobalHydra.instance().clear()


def test_run_with_an_explicit_data_config(compose_deploy, dbb_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={dbb_checkpoint}",
        f"output_dir={out}",
        "data=digits",
        "latency_min_run_time=0.01",
    )
    report = deploy_script.run(cfg)
    assert _listing(out) == ARTIFACTS
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))
    _check_report(report, {"random", "data"}, ARTIFACTS)
    assert report["notes"] == []
    assert report["net_config"] == NET_CONFIG
    assert json.loads((out / "report.json").read_text())["verification"] == report["verification"]
    printed = capsys.readouterr().out
    assert "training form" in printed and f"written to {out}" in printed

    net, _ = deploy_script.load_checkpoint(dbb_checkpoint)
    x = torch.randn(7, 1, 8, 8)  # a batch size the exports never saw
    with torch.no_grad():
        expected = net(x)
        outputs = {
            "deployed.pt": export.load_deployed(out / "deployed.pt")(x),
            "model.pt2": export.load_pt2(out / "model.pt2")(x),
        }
    outputs["model.onnx"] = export.run_onnx(out / "model.onnx", x)
    for name, logits in outputs.items():
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4, msg=name)


def test_run_without_data_verifies_on_random_input_only(compose_deploy, checkpoint, tmp_path):
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}", f"output_dir={out}", "input_shape=[1,8,8]", *MEASURED
    )
    report = deploy_script.run(cfg)
    files = ARTIFACTS - {"model.onnx"}
    _check_report(report, {"random"}, files)
    assert _listing(out) == files
    for form in ("training", "deployed"):
        for batch in ("latency_b1", "latency_b32"):
            assert report["measurements"][form][batch]["median_ms"] > 0


def test_latency_is_opt_in_and_every_stage_is_timed(compose_deploy, checkpoint, tmp_path, capsys):
    """By default deploy.py counts parameters and MACs, skips latency (and says so), runs on
    one thread, and times each stage in its printout and report."""
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}", f"output_dir={out}", "input_shape=[1,8,8]", "onnx=false"
    )
    torch.set_num_threads(2)  # the single_thread fixture puts 1 back after the test
    report = deploy_script.run(cfg)
    assert torch.get_num_threads() == 2  # the caller's thread count is put back
    assert set(report["measurements"]["deployed"]) == {"params", "macs_per_sample"}
    assert report["threads"] == 1
    stages = ["output folder", "load", "inputs", "deploy", "verify", "deployed.pt", "model.pt2"]
    timings = report["timings_s"]
    assert list(timings) == [*stages, "measure", "total"]
    assert all(t >= 0 for t in timings.values())
    assert timings["total"] >= sum(timings[k] for k in stages)
    assert json.loads((out / "report.json").read_text())["timings_s"] == timings
    printed = capsys.readouterr().out
    assert "seconds: output folder " in printed
    assert "CPU latency: not measured (latency=true measures it)" in printed


def test_run_default_output_dir_is_beside_the_run(compose_deploy, checkpoint):
    cfg = compose_deploy(f"ckpt_path={checkpoint}", "input_shape=[1,8,8]", "pt2=false", *FAST)
    report = deploy_script.run(cfg)
    out = checkpoint.parent.parent / "deployed"
    assert report["output_dir"] == str(out)
    assert _listing(out) == {"deployed.pt", "report.json"}
    shutil.rmtree(out)  # the checkpoint fixture is shared


def test_torchscript_only_when_asked(compose_deploy, checkpoint, tmp_path):
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}",
        f"output_dir={out}",
        "input_shape=[1,8,8]",
        "pt2=false",
        "torchscript=true",
        *FAST,
    )
    report = deploy_script.run(cfg)
    assert _listing(out) == {"deployed.pt", "model.ts", "report.json"}
    assert report["checks"]["model.ts"]["relative_diff"] <= 1e-5
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.jit.load(str(out / "model.ts"))(x),
            export.load_deployed(out / "deployed.pt")(x),
            rtol=0,
            atol=1e-5,
        )


def test_a_missing_checkpoint_makes_no_folder(compose_deploy, tmp_path):
    """The default output folder is beside the checkpoint's run: a typo creates nothing."""
    cfg = compose_deploy(f"ckpt_path={tmp_path / 'typo' / 'checkpoints' / 'best.ckpt'}")
    with pytest.raises(DeployError, match="checkpoint not found"):
        deploy_script.run(cfg)
    assert list(tmp_path.iterdir()) == []


def test_run_needs_an_input_shape(compose_deploy, checkpoint, tmp_path):
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}", *FAST)
    with pytest.raises(DeployError, match="input_shape"):
        deploy_script.run(cfg)
    _no_outputs(tmp_path / "out")


def test_failed_verification_writes_nothing(compose_deploy, checkpoint, tmp_path, monkeypatch):
    def tampering_deploy(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
        deployed = rs.deploy(model, inplace=inplace)
        with torch.no_grad():
            next(deployed.parameters()).view(-1)[0] += 0.1
        return deployed

    monkeypatch.setattr(deploy_script, "deploy", tampering_deploy)
    out = tmp_path / "out"
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}", "data=digits", *FAST)
    with pytest.raises(DeployError, match="verification failed.*in float32"):
        deploy_script.run(cfg)
    _no_outputs(out)


def test_verification_runs_with_tf32_off(compose_deploy, checkpoint, tmp_path, monkeypatch):
    """TF32 switched on globally (as cuDNN does on Ampere+) is off while the forms are
    compared, back on afterwards, and the report says how float32 ran."""
    seen = []
    verify = export.verify

    def spy(*args, **kwargs):
        seen.append(torch.backends.cudnn.allow_tf32)
        return verify(*args, **kwargs)

    monkeypatch.setattr(deploy_script.export, "verify", spy)
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}",
        f"output_dir={tmp_path / 'out'}",
        "input_shape=[1,8,8]",
        "pt2=false",
        *FAST,
    )
    # cuDNN's flag only: flipping torch.backends.cuda.matmul.allow_tf32 (the legacy API)
    # leaves torch.get_float32_matmul_precision() raising for the rest of the process
    flag = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        report = deploy_script.run(cfg)
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = flag
    assert seen == [False]
    expected = "CPU: no TF32" if not torch.cuda.is_available() else "TF32 disabled"
    assert expected in report["numerics"]


# --- the output folder is replaced whole ----------------------------------------------------
def test_a_later_export_leaves_no_stale_file(compose_deploy, checkpoint, checkpoint_b, tmp_path):
    """Export A with model.pt2, then B without: A's model.pt2 must not survive beside B."""
    out = tmp_path / "out"
    common = [f"output_dir={out}", "input_shape=[1,8,8]", *FAST]
    deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    assert (out / "model.pt2").exists()
    report = deploy_script.run(compose_deploy(f"ckpt_path={checkpoint_b}", *common, "pt2=false"))
    assert _listing(out) == {"deployed.pt", "report.json"}
    assert json.loads((out / "report.json").read_text())["net_config"]["block"] == "plain"
    assert report["checkpoint"] == str(checkpoint_b)
    net_b, _ = deploy_script.load_checkpoint(checkpoint_b)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(export.load_deployed(out / "deployed.pt")(x), net_b(x))
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


@pytest.mark.parametrize("stage", ["torch.export.save", "report"])
def test_a_crash_mid_write_keeps_the_previous_export(
    compose_deploy, checkpoint, checkpoint_b, tmp_path, monkeypatch, stage
):
    """A writer that dies after writing part of its file (disk full, a kill): the previous
    folder is intact, byte for byte, and no staging folder is left."""
    out = tmp_path / "out"
    pt2 = "pt2=true" if stage == "torch.export.save" else "pt2=false"
    common = [f"output_dir={out}", "input_shape=[1,8,8]", pt2, *FAST]
    deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    before = _snapshot(out)

    def dies_mid_write(obj, path, *args, **kwargs):
        if hasattr(path, "write"):  # a file object (the file is written from memory after)
            path.write(b"partial")
        else:
            Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    if stage == "torch.export.save":
        monkeypatch.setattr(torch.export, "save", dies_mid_write)
    else:
        monkeypatch.setattr(deploy_script.json, "dumps", lambda *a, **k: 1 / 0)
    with pytest.raises((OSError, ZeroDivisionError)):
        deploy_script.run(compose_deploy(f"ckpt_path={checkpoint_b}", *common))
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


def test_failed_file_check_keeps_the_previous_export(
    compose_deploy, checkpoint, checkpoint_b, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    common = [f"output_dir={out}", "input_shape=[1,8,8]", *FAST, "pt2=false"]
    deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    before = _snapshot(out)
    monkeypatch.setattr(export, "max_abs_diff", lambda a, b: 1.0)  # a reloaded file that differs
    with pytest.raises(DeployError, match="deployed.pt: its output differs.*tol_export"):
        deploy_script.run(compose_deploy(f"ckpt_path={checkpoint_b}", *common))
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftover(folder: Path, pid: int, state: str = "staging", **extra) -> Path:
    """A folder as a deploy.py process ``pid`` leaves it: marked with its owner and state."""
    folder.mkdir()
    marker = {"owner": "deploy.py", "state": state, "pid": pid, "host": socket.gethostname()}
    (folder / folders.MARKER).write_text(json.dumps({**marker, "start": None, **extra}))
    (folder / "model.onnx").write_bytes(b"\0" * 1000)
    return folder


def test_leftovers_of_killed_runs_are_removed(compose_deploy, checkpoint, tmp_path):
    """Marked staging and trash folders of dead processes go; a live process's staging folder
    stays, and so does every folder without deploy.py's marker, whatever its name."""
    dead, live = _dead_pid(), os.getppid()
    _leftover(tmp_path / f"{folders.PREFIX}{dead}-x1y2z3", dead)
    _leftover(tmp_path / f"{folders.PREFIX}{dead}-old-0123abcd", dead, "trash", of="other")
    _leftover(tmp_path / f"{folders.PREFIX}{live}-inprogress", live)
    users = [f"{folders.PREFIX}{dead}-mine", ".deploy-k2j3h4", f".deploy-{dead}-old-0-x"]
    for name in users:
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    (tmp_path / users[0] / folders.MARKER).write_text(json.dumps({"owner": "someone else"}))
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}", f"output_dir={out}", "input_shape=[1,8,8]", "pt2=false", *FAST
    )
    deploy_script.run(cfg)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("out", "run"))
    assert left == sorted([f"{folders.PREFIX}{live}-inprogress", *users])
    for name in users:
        assert (tmp_path / name / "notes.txt").read_text() == "mine"


def test_an_export_killed_between_its_renames_is_put_back(compose_deploy, tmp_path):
    """Killed after renaming the old folder away and before renaming the new one in: the
    next run (even one that fails) puts the old export back in place."""
    trash = _leftover(
        tmp_path / f"{folders.PREFIX}{_dead_pid()}-old-0123abcd", 0, "trash", of="out"
    )
    (trash / folders.MARKER).write_text(
        (trash / folders.MARKER).read_text().replace('"pid": 0', f'"pid": {_dead_pid()}')
    )
    (trash / "deployed.pt").write_bytes(b"old export")
    not_a_checkpoint = _bad_file("random_bytes", tmp_path)
    cfg = compose_deploy(f"ckpt_path={not_a_checkpoint}", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(DeployError, match="cannot be loaded safely"):
        deploy_script.run(cfg)
    assert (tmp_path / "out" / "deployed.pt").read_bytes() == b"old export"
    assert folders.is_ours(tmp_path / "out", "deploy.py")
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


# --- a user's own files are never deleted ---------------------------------------------------
def _user_files(folder: Path) -> dict[str, str]:
    """A user's files in ``folder``: a note and a source tree."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "src").mkdir()
    files = {"notes.txt": "my notes", "src/main.py": "print('mine')"}
    for name, text in files.items():
        (folder / name).write_text(text)
    return files


def _survived(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (folder / name).read_text() == text, name


@pytest.mark.usefixtures("no_work")
def test_a_folder_of_the_users_is_refused(compose_deploy, checkpoint, tmp_path):
    out = tmp_path / "mine"
    files = _user_files(out)
    with pytest.raises(
        DeployError, match=r"holds files deploy.py did not write \(notes.txt, src\)"
    ):
        deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}"))
    _survived(out, files)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "src"]
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


def test_overwrite_puts_only_deploy_files_into_a_users_folder(
    compose_deploy, checkpoint, checkpoint_b, tmp_path
):
    """overwrite=true: deploy.py's files land beside the user's, which stay; a second export
    replaces deploy.py's files (a file this export lacks goes) and still no other; the folder
    never becomes one deploy.py would replace whole."""
    out = tmp_path / "mine"
    files = _user_files(out)
    common = [f"output_dir={out}", "input_shape=[1,8,8]", "overwrite=true", *FAST]
    deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    names = {p.name for p in out.iterdir()}
    assert names == {"notes.txt", "src", "deployed.pt", "model.pt2", "report.json"}
    deploy_script.run(compose_deploy(f"ckpt_path={checkpoint_b}", *common, "pt2=false"))
    assert {p.name for p in out.iterdir()} == {"notes.txt", "src", "deployed.pt", "report.json"}
    assert json.loads((out / "report.json").read_text())["checkpoint"] == str(checkpoint_b)
    _survived(out, files)
    assert not folders.is_ours(out, "deploy.py")
    with pytest.raises(DeployError, match="did not write"):
        deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}", *FAST))


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("where", ["run folder", "checkpoints folder", "cwd", "cwd parent"])
def test_a_folder_holding_the_checkpoint_or_cwd_is_refused(
    compose_deploy, tmp_path, monkeypatch, where
):
    run = tmp_path / "runs" / "run"
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    (run / "metrics.json").write_text("{}")
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    out = {
        "run folder": run,
        "checkpoints folder": ckpt.parent,
        "cwd": Path("."),
        "cwd parent": tmp_path,
    }[where]
    what = "the current folder" if where == "cwd" else "the checkpoint"
    for overwrite in ("false", "true"):
        cfg = compose_deploy(f"ckpt_path={ckpt}", f"output_dir={out}", f"overwrite={overwrite}")
        with pytest.raises(DeployError, match=f"holds {what}"):
            deploy_script.run(cfg)
    assert ckpt.read_bytes() == b"weights"
    assert (run / "metrics.json").read_text() == "{}"


def test_a_link_is_followed_and_kept(compose_deploy, checkpoint, tmp_path):
    """output_dir a link to a folder: the export lands in the link's target, the link stays a
    link, and nothing else is left beside either."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    common = [f"output_dir={link}", "input_shape=[1,8,8]", "pt2=false", *FAST]
    for _ in range(2):
        deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
        assert link.is_symlink() and link.resolve() == real.resolve()
        assert _listing(real) == {"deployed.pt", "report.json"}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


@pytest.mark.usefixtures("no_work")
def test_a_dangling_link_is_refused(compose_deploy, checkpoint, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone", target_is_directory=True)
    with pytest.raises(DeployError, match="is a link to .*gone, which is missing"):
        deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={link}"))
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_an_empty_folder_is_taken_over(compose_deploy, checkpoint, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    common = [f"output_dir={out}", "input_shape=[1,8,8]", "pt2=false", *FAST]
    deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    assert _listing(out) == {"deployed.pt", "report.json"}


def test_files_that_appear_while_deploying_are_kept(
    compose_deploy, checkpoint, tmp_path, monkeypatch
):
    """An empty folder that receives a user's file while deploy.py works is not replaced."""
    out = tmp_path / "empty"
    out.mkdir()
    write = deploy_script.write_deployed_pt

    def and_a_user_writes(job, path):
        (out / "notes.txt").write_text("mine")
        return write(job, path)

    first = dataclasses.replace(deploy_script.ARTIFACTS[0], write=and_a_user_writes)
    monkeypatch.setattr(deploy_script, "ARTIFACTS", [first, *deploy_script.ARTIFACTS[1:]])
    common = [f"output_dir={out}", "input_shape=[1,8,8]", "pt2=false", *FAST]
    with pytest.raises(DeployError, match="received files while deploy.py ran"):
        deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


# --- the output folder is checked before any work -------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the checkpoint is ever loaded."""

    def load_checkpoint(path):
        raise AssertionError("the checkpoint was loaded before the output folder was checked")

    monkeypatch.setattr(deploy_script, "load_checkpoint", load_checkpoint)


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("where", ["output_dir", "parent"])
def test_output_dir_that_is_a_file(compose_deploy, checkpoint, tmp_path, where):
    file = tmp_path / "taken"
    file.write_text("keep me")
    out = file if where == "output_dir" else file / "out"
    with pytest.raises(DeployError, match="is a file, not a folder"):
        deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}"))
    assert file.read_text() == "keep me"
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


@pytest.mark.usefixtures("no_work")
def test_unwritable_output_parent(compose_deploy, checkpoint, tmp_path, monkeypatch):
    def mkdtemp(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(folders.tempfile, "mkdtemp", mkdtemp)
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(DeployError, match="cannot write beside output folder .*Permission denied"):
        deploy_script.run(cfg)


@pytest.mark.usefixtures("no_work")
def test_unwritable_output_folder(compose_deploy, checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != out and access(p, mode))
    with pytest.raises(DeployError, match=f"output folder {out} is not writable"):
        deploy_script.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}"))
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_for_real(compose_deploy, checkpoint, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(DeployError, match="cannot write beside output folder"):
            deploy_script.run(
                compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={parent / 'out'}")
            )
    finally:
        parent.chmod(0o755)


@pytest.mark.usefixtures("no_work")
def test_missing_onnx_gives_the_install_hint(compose_deploy, checkpoint, tmp_path, monkeypatch):
    """A base install has no onnx/onnxruntime/onnxscript: one line saying what to install."""
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(DeployError) as info:
        deploy_script.run(cfg)
    assert str(info.value) == (
        "ONNX export needs onnx, onnxruntime and onnxscript: pip install 'repsqueeze[export]', "
        "or onnx=false"
    )
    _no_outputs(tmp_path / "out")


# --- bad checkpoints -------------------------------------------------------------------------
def _set(key: str, value: float, index: int = 0):
    def edit(state: dict) -> None:
        state[key].view(-1)[index] = value

    return edit


BROKEN_WEIGHTS = {
    "nan_weight": (
        _set("net.stem.0.branches.0.0.weight", float("nan")),
        "stem.0.branches.0.0.weight holds 1 NaN/Inf",
    ),
    "inf_bias": (_set("net.head.bias", float("inf"), 3), "head.bias holds 1 NaN/Inf"),
    "negative_running_var": (
        _set("net.stages.1.0.0.branches.1.1.running_var", -0.5),
        "stages.1.0.0.branches.1.1.running_var has negative entries",
    ),
}


@pytest.mark.parametrize("kind", BROKEN_WEIGHTS)
def test_broken_weights_are_refused(compose_deploy, tmp_path, kind):
    edit, message = BROKEN_WEIGHTS[kind]
    ckpt = _write_checkpoint(tmp_path / "broken.ckpt", NET_CONFIG, edit=edit)
    cfg = compose_deploy(f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'out'}", *FAST)
    with pytest.raises(DeployError, match=message.replace(".", r"\.")):
        deploy_script.run(cfg)
    _no_outputs(tmp_path / "out")


@pytest.mark.parametrize(
    ("net_config", "message"),
    [
        (
            {**NET_CONFIG, "num_classes": -1},
            "net_config num_classes=-1: must be a positive integer",
        ),
        ({**NET_CONFIG, "in_channels": 0}, "net_config in_channels=0: must be a positive integer"),
        ({**NET_CONFIG, "num_classes": "ten"}, "net_config num_classes='ten'"),
    ],
)
def test_bad_net_config_names_the_key(tmp_path, net_config, message):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net_config": net_config}}, path)
    with pytest.raises(DeployError, match=message):
        deploy_script.load_checkpoint(path)


def test_weights_that_do_not_fit_name_keys_and_shapes(checkpoint, tmp_path):
    """A 5-class head stored under a 10-class net_config; a stray key; a missing key."""
    ckpt = torch.load(checkpoint, weights_only=True)
    state = ckpt["state_dict"]
    state["net.head.weight"] = state["net.head.weight"][:5]
    state["net.extra.weight"] = torch.zeros(2)
    del state["net.head.bias"]
    path = tmp_path / "mismatch.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(DeployError) as info:
        deploy_script.load_checkpoint(path)
    message = str(info.value)
    assert "weights do not fit" in message
    assert "missing head.bias" in message
    assert "unexpected extra.weight" in message
    assert "head.weight (5, 64) vs (10, 64) expected" in message


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("[3,8,8]", r"input_shape \[3, 8, 8\] does not fit the network: .*channels"),
        ("[1,0,8]", "give \\[C,H,W\\] as positive integers"),
        ("seven", "give \\[C,H,W\\] as positive integers"),
    ],
)
def test_wrong_input_shape(compose_deploy, checkpoint, tmp_path, shape, message):
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}", f"input_shape={shape}", *FAST
    )
    with pytest.raises(DeployError, match=message):
        deploy_script.run(cfg)
    _no_outputs(tmp_path / "out")


def test_a_deployed_file_is_not_deployed_again(checkpoint, tmp_path):
    net, net_config = deploy_script.load_checkpoint(checkpoint)
    path = tmp_path / "deployed.pt"
    export.save_deployed(rs.deploy(net), path, net_config)
    with pytest.raises(DeployError, match="is already deployed.*load_deployed.*checkpoints/"):
        deploy_script.load_checkpoint(path)


def test_a_gpu_checkpoint_loads_on_the_cpu(checkpoint, tmp_path, monkeypatch):
    """A checkpoint whose tensors were saved on ``cuda:0`` (the storage location recorded
    in the file, as train.py on a GPU writes it) is mapped to the CPU."""
    ckpt = torch.load(checkpoint, weights_only=True)
    path = tmp_path / "gpu.ckpt"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, path)
    if not torch.cuda.is_available():  # control: the file really says cuda
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    net, _ = deploy_script.load_checkpoint(path)
    assert {t.device.type for t in net.state_dict().values()} == {"cpu"}
    x = torch.randn(2, 1, 8, 8)
    reference, _ = deploy_script.load_checkpoint(checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=0, atol=0)


def test_a_network_without_blocks_deploys_as_is(compose_deploy, tmp_path, plain_cnn_registered):
    """What ``rs.contract`` returns (torch layers only): nothing to squeeze, still verified
    and exported."""
    config = {"name": "deploy_test_plain_cnn", "num_classes": 4, "in_channels": 1}
    ckpt = _write_checkpoint(tmp_path / "plain.ckpt", config)
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={ckpt}", f"output_dir={out}", "input_shape=[1,8,8]", "use_data=false", *MEASURED
    )
    report = deploy_script.run(cfg)
    assert report["notes"] == ["nothing to squeeze: the network has no re-parameterizable block"]
    assert report["verification"]["random"]["float64"] == 0
    assert _listing(out) == {"deployed.pt", "model.pt2", "report.json"}
    m = report["measurements"]
    assert (
        m["deployed"]["macs_per_sample"] == m["training"]["macs_per_sample"] == 8 * 9 * 64 + 8 * 4
    )


def _bad_file(kind: str, folder: Path) -> Path:
    """A file ``deploy.py`` must refuse; ``folder / "MARKER"`` appears if pickled code ran."""
    path = folder / f"{kind}.ckpt"
    marker = folder / "MARKER"
    if kind == "random_bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "pickled_object":  # a checkpoint-looking file carrying code
        torch.save({"state_dict": {}, "hyper_parameters": CreatesMarker(marker)}, path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps(CreatesMarker(marker)))
    elif kind == "no_net_config":
        torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, path)
    elif kind != "missing":
        raise ValueError(kind)
    return path


BAD_FILES = {
    "missing": "checkpoint not found",
    "random_bytes": "cannot be loaded safely",
    "tensor": "not a Lightning checkpoint",
    "pickled_object": "cannot be loaded safely",
    "plain_pickle": "cannot be loaded safely",
    "no_net_config": "no net_config",
}


def test_the_marker_is_a_real_probe(tmp_path):
    """Control: unpickling ``CreatesMarker`` with code execution does create the marker."""
    path = _bad_file("pickled_object", tmp_path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("kind", BAD_FILES)
def test_load_checkpoint_refuses(tmp_path, kind):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(DeployError, match=BAD_FILES[kind] or None) as info:
        deploy_script.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    "checkpoint_dict",
    [
        {"state_dict": {}, "hyper_parameters": {"net_config": {"name": "no_such_net"}}},
        {"state_dict": {}, "hyper_parameters": {"net_config": {"name": "digits_net", "blok": 1}}},
        {"state_dict": {}, "hyper_parameters": ["not", "a", "dict"]},
        {"state_dict": ["not", "a", "dict"], "hyper_parameters": {"net_config": NET_CONFIG}},
    ],
    ids=["unknown_model", "unknown_argument", "hparams_not_a_dict", "state_dict_not_a_dict"],
)
def test_malformed_checkpoint_is_a_deploy_error(tmp_path, checkpoint_dict):
    """Bug: these raise ValueError/TypeError/AttributeError, so ``python deploy.py`` prints a
    traceback instead of a one-line ``deploy.py: error:``."""
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint_dict, path)
    with pytest.raises(DeployError, match=str(path)):
        deploy_script.load_checkpoint(path)


def test_refusal_message_is_plain_text(tmp_path):
    """Bug: torch's weights-only message carries ANSI bold escapes (``\\x1b[1m``) and is cut
    after "you have two options," without the options; the one-line error repeats both."""
    path = _bad_file("pickled_object", tmp_path)
    with pytest.raises(DeployError) as info:
        deploy_script.load_checkpoint(path)
    assert "\x1b" not in str(info.value)


# --- subprocess: python deploy.py ----------------------------------------------------------
def _run_deploy(
    tmp_path: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python deploy.py`` from the repository root; Hydra's own files go to tmp_path."""
    command = [
        sys.executable,
        str(ROOT / "deploy.py"),
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "latency_min_run_time=0.01",
        *overrides,
    ]
    env = {
        **{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _assert_one_line_error(result: subprocess.CompletedProcess, match: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("deploy.py: error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert match in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", BAD_FILES)
def test_script_refuses_bad_files(tmp_path, kind):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    result = _run_deploy(tmp_path, f"ckpt_path={_bad_file(kind, inputs)}", f"output_dir={out}")
    _assert_one_line_error(result, BAD_FILES[kind])
    assert not (inputs / "MARKER").exists()
    _no_outputs(out)
    assert "written to" not in result.stdout


def test_script_without_ckpt_path_is_a_one_line_error(tmp_path):
    """Bug: ``cfg.ckpt_path`` is ``???``; omegaconf's MissingMandatoryValue escapes ``main``
    and Hydra prints a traceback."""
    result = _run_deploy(tmp_path, f"output_dir={tmp_path / 'out'}")
    _assert_one_line_error(result, "ckpt_path")


def test_entry_errors_are_one_line_unless_asked(
    compose_deploy, checkpoint, tmp_path, capsys, monkeypatch
):
    """What ``main`` runs: an output_dir that is a file is one line on stderr and status 1;
    an unexpected exception too, with its type; with HYDRA_FULL_ERROR=1 the traceback."""
    taken = tmp_path / "taken"
    taken.write_text("")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={taken}")
    assert deploy_script.entry(cfg) == 1
    assert capsys.readouterr().err == (
        f"deploy.py: error: output_dir {taken} is a file, not a folder\n"
    )

    def bug(_cfg):
        raise KeyError("state_dict")

    monkeypatch.setattr(deploy_script, "run", bug)
    assert deploy_script.entry(cfg) == 1
    err = capsys.readouterr().err
    assert err.startswith("deploy.py: error: KeyError: 'state_dict' (HYDRA_FULL_ERROR=1")
    assert err.count("\n") == 1
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(KeyError):
        deploy_script.entry(cfg)


@pytest.mark.gpu
def test_a_checkpoint_trained_on_the_gpu_deploys_on_a_cpu_only_machine(tmp_path):
    """One SGD step on CUDA, saved with its CUDA tensors; deploy.py with no GPU visible
    loads it on the CPU; deploy.py with device=cuda verifies on the GPU with TF32 on
    globally (strict_fp32 turns it off for the comparison)."""
    model = Classifier(NET_CONFIG).cuda()
    randomize_bn(model.net, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    nn.functional.cross_entropy(model.net(x), y).backward()
    optimizer.step()
    ckpt = tmp_path / "run" / "checkpoints" / "gpu.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    assert next(iter(torch.load(ckpt, weights_only=True)["state_dict"].values())).is_cuda

    out = tmp_path / "out"
    common = [f"ckpt_path={ckpt}", "input_shape=[1,8,8]"]
    result = _run_deploy(
        tmp_path, *common, "onnx=false", f"output_dir={out}", env={"CUDA_VISIBLE_DEVICES": ""}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert "CPU: no TF32" in report["numerics"]
    net = model.net.cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(
            export.load_deployed(out / "deployed.pt")(x.cpu()), net(x.cpu()), rtol=1e-5, atol=1e-5
        )

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        GlobalHydra.instance().clear()
        initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
        cfg = compose(
            "deploy", overrides=[*common, f"output_dir={tmp_path / 'cuda'}", "device=cuda", *FAST]
        )
        report = deploy_script.run(cfg)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        GlobalHydra.instance().clear()
    assert "TF32 disabled" in report["numerics"] and "cuda" in report["numerics"]
    for errors in report["verification"].values():
        assert errors["float32"] <= TOL32


# --- end to end: train(cfg), then python deploy.py -------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Three epochs of digits through ``train(cfg)``, as ``python train.py`` would run them."""
    run_dir = tmp_path_factory.mktemp("train_run")
    overrides = [f"paths.{key}={run_dir}" for key in ("root_dir", "log_dir", "output_dir")]
    overrides += ["callbacks.progress_bar.refresh_rate=0", "logger=none", "trainer.max_epochs=3"]
    GlobalHydra.instance().clear()
    try:
        initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
        cfg = compose("train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics, objects = train(cfg)
    finally:
        torch.set_num_threads(threads)
    # hydra.main saves the composed config in the run directory; train(cfg) alone does not.
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    datamodule = objects["datamodule"]
    datamodule.setup("test")
    x, y = datamodule.test_set.tensors
    return SimpleNamespace(
        ckpt=run_dir / "checkpoints" / "best.ckpt",
        metrics=metrics,
        net_config=dict(objects["model"].hparams.net_config),
        net=objects["model"].net.cpu().eval(),
        x=x,
        y=y,
    )


@pytest.fixture(scope="module")
def deployed_dir(trained, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("deploy")
    out = tmp / "out"
    result = _run_deploy(tmp, f"ckpt_path={trained.ckpt}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"written to {out}" in result.stdout
    assert not list(tmp.glob(f"{folders.PREFIX}*"))
    return out


@pytest.mark.slow
def test_script_writes_verified_artifacts(trained, deployed_dir):
    assert _listing(deployed_dir) == ARTIFACTS
    report = json.loads((deployed_dir / "report.json").read_text())
    _check_report(report, {"random", "data"}, ARTIFACTS)  # "data": from the run's .hydra config
    assert report["notes"] == []
    assert report["checkpoint"] == str(trained.ckpt)
    assert report["net_config"] == trained.net_config
    for name in ("deployed.pt", "model.pt2", "model.onnx"):
        assert report["files"][name] == (deployed_dir / name).stat().st_size


@pytest.mark.slow
def test_exported_models_agree_on_the_test_set(trained, deployed_dir):
    """Training form, deployed.pt, torch.export and onnxruntime: same logits, same accuracy."""
    with torch.no_grad():
        logits = {
            "training": trained.net(trained.x),
            "deployed.pt": export.load_deployed(deployed_dir / "deployed.pt")(trained.x),
            "model.pt2": export.load_pt2(deployed_dir / "model.pt2")(trained.x),
        }
    logits["model.onnx"] = export.run_onnx(deployed_dir / "model.onnx", trained.x)
    accuracy = {k: (v.argmax(1) == trained.y).float().mean().item() for k, v in logits.items()}
    for name, value in logits.items():
        torch.testing.assert_close(value, logits["training"], rtol=0, atol=1e-4, msg=name)
    assert len(set(accuracy.values())) == 1, accuracy
    assert accuracy["training"] == pytest.approx(trained.metrics["test/acc"], abs=1e-6)
    assert accuracy["training"] >= 0.9


@pytest.mark.slow
def test_script_with_explicit_data_on_a_bare_checkpoint(trained, tmp_path):
    """A checkpoint copied out of its run (no .hydra/config.yaml): ``data=digits`` gives the
    real batch; without it the input shape cannot be told."""
    ckpt = tmp_path / "best.ckpt"
    shutil.copy(trained.ckpt, ckpt)
    result = _run_deploy(tmp_path, f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'none'}")
    _assert_one_line_error(result, "input_shape")
    _no_outputs(tmp_path / "none")

    out = tmp_path / "out"
    result = _run_deploy(tmp_path, f"ckpt_path={ckpt}", f"output_dir={out}", "data=digits")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_report(json.loads((out / "report.json").read_text()), {"random", "data"}, ARTIFACTS)
