"""Run folders: one per run, named by the run itself, never shared with another run.

Importing this module registers the OmegaConf resolver ``${run_id:}`` that
``configs/hydra/default.yaml`` puts into every run and sweep folder name: the process id and
random hex digits, fixed for the life of the process. Two runs started in the same second
therefore get two folders, and a run can tell a folder it named from one a user gave it
(``hydra.run.dir=...``).
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path

from omegaconf import OmegaConf


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


if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id)
