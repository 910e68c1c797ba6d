"""Writing files and folders a user relies on: whole, or not at all.

A single file is written under a temporary name beside it and renamed onto it
(:func:`atomic_path`, :func:`save_atomic`). A folder is replaced whole, without ever touching a
folder the program did not make: a folder written by :func:`publish` carries a marker file
(:data:`MARKER`): JSON naming its owner and state. Only such a folder is replaced whole later;
an empty folder is taken over; any other existing folder is refused, or, with
``overwrite=True``, receives the new files by name while everything else in it stays. Work in
progress lives in a staging folder beside the target whose marker holds the owning process
(pid, host, start time): a later run removes it only once that process is gone, never because
of its name alone. Links are followed: the files land in the folder a link points to, and the
link itself stays.

A reader of the target sees the previous folder or the new one, never a mix (two renames; a
run killed between them is put back by the next one).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = ".repsqueeze-folder.json"
PREFIX = ".repsqueeze-"  # staging and trash folders beside the target: .repsqueeze-<pid>-...


# --- one file ---------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keeps the suffix: torch.export.save warns about a file not ending in .pt2
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_atomic(path: str | Path, write: Callable[[io.BytesIO], Any]) -> None:
    """Writes what ``write(buffer)`` serializes to ``path`` atomically: into memory first,
    then to disk from Python, so that a full disk is an ``OSError`` naming the file (PyTorch's
    zip writer aborts the process when a write fails, e.g. ``torch.save`` on a full disk).

    Args:
        path: the file to (re)place.
        write: e.g. ``lambda f: torch.save(obj, f)``.
    """
    buffer = io.BytesIO()
    write(buffer)
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(buffer.getbuffer())
        except OSError as err:
            err.filename = err.filename or str(path)
            raise


# --- one folder -------------------------------------------------------------------------------
class FolderError(Exception):
    """The target folder cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Target:
    """Where :func:`publish` puts the files.

    Attributes:
        path: the folder as given (absolute), for messages.
        real: the same folder with every link resolved: where the files land.
        whole: replace the folder whole (it is missing, empty or marked as ours); otherwise
            only the files of the new export are put in by name.
    """

    path: Path
    real: Path
    whole: bool


def check_target(
    path: str | Path, owner: str, protect: Iterable[tuple[str, Path]] = (), overwrite: bool = False
) -> Target:
    """Checks that ``path`` may receive an export of ``owner`` before any work is done.

    Args:
        path: the output folder (it may not exist yet).
        owner: who writes it (``"deploy.py"``), recorded in the marker and named in messages.
        protect: ``(what, path)`` pairs that must stay outside the target (the checkpoint
            being read, the current folder): a target that is one of them or holds one is
            refused, since replacing it would delete them.
        overwrite: for an existing folder that ``owner`` did not write: put the new files
            in by name and leave everything else, instead of refusing.

    Raises:
        FolderError: a file where a folder is needed, a dangling link, a folder that holds a
            protected path, an unwritable folder, or a foreign folder without ``overwrite``.
    """
    given = Path(path).absolute()
    if given.is_symlink() and not given.exists():
        raise FolderError(f"output_dir {given} is a link to {os.readlink(given)}, which is missing")
    real = given.resolve()
    existing = real
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        what = "output_dir" if existing == real else f"{existing}, a parent of output_dir,"
        raise FolderError(f"{what} {given} is a file, not a folder")
    for what, other in protect:
        other = Path(other).resolve()
        if other == real or real in other.parents:
            raise FolderError(
                f"output_dir {given} holds {what} ({other}); {owner} replaces its output folder "
                "whole: choose a folder outside it"
            )
    if not real.is_dir():
        return Target(given, real, whole=True)
    if not os.access(real, os.W_OK | os.X_OK):
        raise FolderError(f"output folder {given} is not writable")
    entries = sorted(p.name for p in real.iterdir())
    if not entries or _marker(real, owner).get("state") == "export":
        return Target(given, real, whole=True)
    if overwrite:
        return Target(given, real, whole=False)
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise FolderError(
        f"output_dir {given} holds files {owner} did not write ({shown}): choose a new or empty "
        f"folder, or give overwrite=true to put {owner}'s files in it and leave the rest"
    )


def stage(target: Target, owner: str) -> Path:
    """Removes what killed runs of ``owner`` left beside the target, then returns a new empty
    staging folder there, marked with this process.

    Raises:
        FolderError: nothing can be written beside the target.
    """
    parent = target.real.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target.real, owner)
        staging = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
        try:
            _write_marker(staging, owner, "staging")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError as err:
        raise FolderError(
            f"cannot write beside output folder {target.path}: {err.strerror or err} "
            f"({err.filename or parent})"
        ) from err
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700 folders
    return staging


def publish(staging: Path, target: Target, owner: str, names: Iterable[str] = ()) -> None:
    """Moves the staged files onto the target.

    A whole target: the old folder is renamed away (its marker says by whom, so a run killed
    here is put back by the next one), the staging folder renamed onto it, the old one deleted.
    Otherwise each staged file replaces the file of its name, files named in ``names`` (the
    owner's own) that this export no longer has are deleted, and nothing else is touched.
    """
    real = target.real
    if not target.whole:
        (staging / MARKER).unlink()
        staged = {p.name for p in staging.iterdir()}
        for name in sorted(staged):
            os.replace(staging / name, real / name)
        for name in set(names) - staged:
            if (real / name).is_file() and not (real / name).is_symlink():
                (real / name).unlink()
        staging.rmdir()
        return
    _write_marker(staging, owner, "export")
    trash = None
    if is_ours(real, owner):
        trash = real.parent / f"{PREFIX}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        _write_marker(real, owner, "trash", of=real.name)
        os.rename(real, trash)
    elif real.is_dir():
        try:
            real.rmdir()  # empty when checked; refused if files appeared since
        except OSError as err:
            raise FolderError(
                f"output_dir {target.path} received files while {owner} ran; nothing replaced"
            ) from err
    os.rename(staging, real)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def discard(staging: Path, owner: str) -> None:
    """Deletes a staging folder of this process (after a failure); nothing else."""
    if staging.is_dir() and _marker(staging, owner).get("pid") == os.getpid():
        shutil.rmtree(staging, ignore_errors=True)


def remove_stale(real: Path, owner: str) -> None:
    """Removes the staging and trash folders of ``owner``'s processes that no longer run,
    found beside ``real`` by their marker; the trash of ``real`` itself (a run killed between
    its two renames) is put back first when ``real`` is missing. Unmarked folders stay."""
    for path in sorted(real.parent.glob(f"{PREFIX}*")):
        if path.is_symlink() or not path.is_dir():
            continue
        marker = _marker(path, owner)
        if marker.get("state") not in ("staging", "trash") or _alive(marker):
            continue
        if marker["state"] == "trash" and marker.get("of") == real.name and not real.exists():
            _write_marker(path, owner, "export")
            os.rename(path, real)
        else:
            shutil.rmtree(path, ignore_errors=True)


def is_ours(folder: Path, owner: str) -> bool:
    """Whether ``folder`` is an export folder written by ``owner``."""
    return _marker(folder, owner).get("state") == "export"


def _marker(folder: Path, owner: str) -> dict:
    """The marker of ``folder`` when ``owner`` wrote it, else ``{}``."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) and marker.get("owner") == owner else {}


def _write_marker(folder: Path, owner: str, state: str, **extra: object) -> None:
    marker = {"owner": owner, "state": state, **_process(), **extra}
    tmp = folder / f"{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(marker))
    os.replace(tmp, folder / MARKER)


def _process(pid: int | None = None) -> dict:
    """This process (or ``pid``) as a marker records it: pid, host and start time."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)}


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(marker: dict) -> bool:
    """Whether the process that wrote ``marker`` may still be running (another host's
    process counts as alive: it cannot be seen from here)."""
    pid = marker.get("pid")
    if not isinstance(pid, int) or marker.get("host") != socket.gethostname():
        return True
    if pid == os.getpid():
        return False  # this process has none in progress while it prepares a new one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = marker.get("start")
    return start is None or _start_time(pid) in (None, start)
