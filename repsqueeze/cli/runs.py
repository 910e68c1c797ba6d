"""Run folders: one per run, named by the run itself, never shared with another run.

Importing this module registers the OmegaConf resolver ``${run_id:}`` that
``configs/hydra/default.yaml`` puts into every run and sweep folder name: the process id and
random hex digits, fixed for the life of the process. Two runs started in the same second
therefore get two folders, and a run can tell a folder it named from one a user gave it
(``hydra.run.dir=...``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from repsqueeze.cli.errors import one_line

METRICS_FILE = "metrics.json"  # how a run ended, and its metrics
LOG_FOLDERS = (".hydra", "csv", "tensorboard")  # a run's own logs (configs/logger/*)


@functools.cache
def run_id() -> str:
    """This process's run id, ``<pid>-<6 hex digits>``."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def named_by_this_run(folder: str | Path) -> bool:
    """Whether this process named ``folder``: its name, or for a job of a sweep its parent's
    (``<sweep folder>/<job number>``), ends in this process's run id."""
    folder = Path(folder)
    return folder.name.endswith(run_id()) or (
        folder.name.isdigit() and folder.parent.name.endswith(run_id())
    )


def remove_if_empty(run_dir: Path, log_dir: Path | None = None) -> bool:
    """Removes a run folder that this run named (its name ends in this process's
    :func:`run_id`: a folder given with ``hydra.run.dir`` is never
    removed) and that holds only this run's logs (``.hydra/``, ``*.log``, the loggers'
    :data:`LOG_FOLDERS`) and empty folders; anything else (a checkpoint, metrics) keeps it.
    Then removes the folders above it that it leaves empty, up to ``log_dir`` (kept).
    Returns whether it removed it."""
    run_dir = run_dir.resolve()
    cwd = Path.cwd().resolve()
    if not run_dir.is_dir() or run_dir in (cwd, *cwd.parents):
        return False
    if not named_by_this_run(run_dir):
        return False
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if path.is_dir() or relative.parts[0] in LOG_FOLDERS:
            continue
        if len(relative.parts) == 1 and path.suffix == ".log":
            continue
        return False
    shutil.rmtree(run_dir)
    stop = log_dir.resolve() if log_dir is not None else None
    parent = run_dir.parent
    while stop is not None and stop in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True


def close_failed_run(
    run_dir: Path,
    log_dir: Path,
    err: BaseException,
    sweep: bool,
    folder_setting: str = "paths.log_dir",
) -> None:
    """After a failure: a run folder that holds nothing but logs is removed (see
    :func:`remove_if_empty`; in a sweep it is kept, for the comparison to list the job);
    any other is kept, with ``metrics.json`` saying how the run ended (``status``
    ``failed`` or ``interrupted``, the one-line ``error``, and the metrics logged so far;
    ``folder_setting`` is the setting its error line names to move the output)."""
    if not sweep and remove_if_empty(run_dir, log_dir):
        return
    if not run_dir.is_dir():
        return
    metrics = {**getattr(err, "metrics", {}), "status": getattr(err, "status", "failed")}
    metrics["error"] = one_line(err, folder_setting)
    with contextlib.suppress(OSError):  # a full or read-only disk: the error line says so
        (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")


if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id)
