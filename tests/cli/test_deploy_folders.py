"""``deploy.py``'s output folder: checked before any work, replaced whole, a user's files
never deleted (see :mod:`repsqueeze.files`)."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deploy_support import DEPLOYED_ONLY, FAST, bad_file, listing, no_outputs

from repsqueeze import artifacts, checkpoints, export
from repsqueeze import files as folders
from repsqueeze.cli import deploy as cli_deploy

DeployError = cli_deploy.DeployError

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the checkpoint is ever read."""

    def read_checkpoint(path):
        raise AssertionError("the checkpoint was read before the output folder was checked")

    monkeypatch.setattr(checkpoints, "read_checkpoint", read_checkpoint)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# --- the output folder is replaced whole ----------------------------------------------------
def test_a_later_export_leaves_no_stale_file(compose_deploy, checkpoint, checkpoint_b, tmp_path):
    """Export A with model.pt2, then B without: A's model.pt2 must not survive beside B."""
    out = tmp_path / "out"
    common = [f"output_dir={out}", "input_shape=[1,8,8]", *FAST]
    cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    assert (out / "model.pt2").exists()
    report = cli_deploy.run(
        compose_deploy(f"ckpt_path={checkpoint_b}", *common, "formats.pt2=false")
    )
    assert listing(out) == {"deployed.pt", "report.json"}
    assert json.loads((out / "report.json").read_text())["net_config"]["block"] == "plain"
    assert report["checkpoint"] == str(checkpoint_b)
    net_b = checkpoints.load_network(checkpoint_b)
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
    pt2 = "formats.pt2=true" if stage == "torch.export.save" else "formats.pt2=false"
    common = [f"output_dir={out}", "input_shape=[1,8,8]", pt2, *FAST]
    cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
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
        monkeypatch.setattr(json, "dumps", lambda *a, **k: 1 / 0)
    with pytest.raises((OSError, ZeroDivisionError)):
        cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint_b}", *common))
    assert _snapshot(out) == before
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


def test_failed_file_check_keeps_the_previous_export(
    compose_deploy, checkpoint, checkpoint_b, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    common = [f"output_dir={out}", "input_shape=[1,8,8]", *FAST, "formats.pt2=false"]
    cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    before = _snapshot(out)
    monkeypatch.setattr(export, "max_abs_diff", lambda a, b: 1.0)  # a reloaded file that differs
    with pytest.raises(DeployError, match="deployed.pt: its output differs.*tol.export"):
        cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint_b}", *common))
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
        f"ckpt_path={checkpoint}",
        f"output_dir={out}",
        *DEPLOYED_ONLY,
    )
    cli_deploy.run(cfg)
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
    not_a_checkpoint = bad_file("random_bytes", tmp_path)
    cfg = compose_deploy(f"ckpt_path={not_a_checkpoint}", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(DeployError, match="cannot be loaded safely"):
        cli_deploy.run(cfg)
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
        cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}"))
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
    cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    names = {p.name for p in out.iterdir()}
    assert names == {"notes.txt", "src", "deployed.pt", "model.pt2", "report.json"}
    cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint_b}", *common, "formats.pt2=false"))
    assert {p.name for p in out.iterdir()} == {"notes.txt", "src", "deployed.pt", "report.json"}
    assert json.loads((out / "report.json").read_text())["checkpoint"] == str(checkpoint_b)
    _survived(out, files)
    assert not folders.is_ours(out, "deploy.py")
    with pytest.raises(DeployError, match="did not write"):
        cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}", *FAST))


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
            cli_deploy.run(cfg)
    assert ckpt.read_bytes() == b"weights"
    assert (run / "metrics.json").read_text() == "{}"


def test_a_link_is_followed_and_kept(compose_deploy, checkpoint, tmp_path):
    """output_dir a link to a folder: the export lands in the link's target, the link stays a
    link, and nothing else is left beside either."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    common = [f"output_dir={link}", *DEPLOYED_ONLY]
    for _ in range(2):
        cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
        assert link.is_symlink() and link.resolve() == real.resolve()
        assert listing(real) == {"deployed.pt", "report.json"}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


@pytest.mark.usefixtures("no_work")
def test_a_dangling_link_is_refused(compose_deploy, checkpoint, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone", target_is_directory=True)
    with pytest.raises(DeployError, match="is a link to .*gone, which is missing"):
        cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={link}"))
    assert link.is_symlink() and not (tmp_path / "gone").exists()


def test_an_empty_folder_is_taken_over(compose_deploy, checkpoint, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    common = [f"output_dir={out}", *DEPLOYED_ONLY]
    cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    assert listing(out) == {"deployed.pt", "report.json"}


def test_files_that_appear_while_deploying_are_kept(
    compose_deploy, checkpoint, tmp_path, monkeypatch
):
    """An empty folder that receives a user's file while deploy.py works is not replaced."""
    out = tmp_path / "empty"
    out.mkdir()
    write = artifacts.write_deployed_pt

    def and_a_user_writes(job, path):
        (out / "notes.txt").write_text("mine")
        return write(job, path)

    first = dataclasses.replace(artifacts.ARTIFACTS[0], write=and_a_user_writes)
    monkeypatch.setattr(artifacts, "ARTIFACTS", [first, *artifacts.ARTIFACTS[1:]])
    common = [f"output_dir={out}", *DEPLOYED_ONLY]
    with pytest.raises(DeployError, match="received files while deploy.py ran"):
        cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", *common))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


# --- the output folder is checked before any work -------------------------------------------


@pytest.mark.usefixtures("no_work")
@pytest.mark.parametrize("where", ["output_dir", "parent"])
def test_output_dir_that_is_a_file(compose_deploy, checkpoint, tmp_path, where):
    file = tmp_path / "taken"
    file.write_text("keep me")
    out = file if where == "output_dir" else file / "out"
    with pytest.raises(DeployError, match="is a file, not a folder"):
        cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}"))
    assert file.read_text() == "keep me"
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


@pytest.mark.usefixtures("no_work")
def test_unwritable_output_parent(compose_deploy, checkpoint, tmp_path, monkeypatch):
    def mkdtemp(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(folders.tempfile, "mkdtemp", mkdtemp)
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(DeployError, match="cannot write beside output folder .*Permission denied"):
        cli_deploy.run(cfg)


@pytest.mark.usefixtures("no_work")
def test_unwritable_output_folder(compose_deploy, checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != out and access(p, mode))
    with pytest.raises(DeployError, match=f"output folder {out} is not writable"):
        cli_deploy.run(compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}"))
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_for_real(compose_deploy, checkpoint, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(DeployError, match="cannot write beside output folder"):
            cli_deploy.run(
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
        cli_deploy.run(cfg)
    assert str(info.value) == (
        "ONNX export needs onnx, onnxruntime and onnxscript: pip install 'repsqueeze[export]', "
        "or formats.onnx=false"
    )
    no_outputs(tmp_path / "out")
