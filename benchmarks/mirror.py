"""The peers' official code, read from copies of their repositories fetched beside this one.

The copies are bare git mirrors, by default under ``/work/.mirror``, or the folder named by
``REPSQUEEZE_MIRROR``: ``<owner>+<name>/repo``. Their code is read from there at benchmark
time and never copied into this repository; a benchmark row whose copy is absent is left out
with a note.
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

MIRROR = Path(os.environ.get("REPSQUEEZE_MIRROR", "/work/.mirror"))
_COPIES: list[tempfile.TemporaryDirectory] = []  # the extracted sources, kept while running


def where(repo: str) -> Path:
    """The folder of the fetched copy of ``repo`` (``owner/name``)."""
    return MIRROR / repo.replace("/", "+")


def official_module(repo: str, module: str) -> ModuleType | None:
    """Module ``module`` (a dotted name) of the fetched copy of ``repo``; ``None`` without one.

    The copy's files are extracted to a temporary folder (kept while the process runs) and
    imported from there; the modules it loaded are dropped from ``sys.modules`` afterwards
    (the repositories share top-level module names such as ``dbb_transforms``).
    """
    git_dir = where(repo) / "repo"
    if not git_dir.is_dir():
        return None
    archive = subprocess.run(
        ["git", "--git-dir", str(git_dir), "archive", "HEAD"], capture_output=True, check=True
    ).stdout
    copy = tempfile.TemporaryDirectory(prefix="repsqueeze-peer-")
    _COPIES.append(copy)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(copy.name, filter="data")
    sys.path.insert(0, copy.name)
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(copy.name)
        for key, mod in list(sys.modules.items()):
            if str(getattr(mod, "__file__", "") or "").startswith(copy.name):
                del sys.modules[key]
