"""The one error family of the command lines and its one-line printer.

:class:`SettingError` (a :class:`repsqueeze.errors.ConfigError`) names the setting, its value
and the fix; :func:`report` prints any exception as one line ``<prog>: error: ...`` (a full
disk, a read-only folder, a library error with its type) and returns the exit status; the
traceback only with ``HYDRA_FULL_ERROR=1`` (:func:`full_error`).
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hydra.errors import HydraException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from repsqueeze.errors import ConfigError


class SettingError(ConfigError):
    """A setting (or a file a setting names) that cannot work: one line, exit ``exit_code``.

    Args:
        message: what is wrong, and the fix when there is one.
        key: the setting, as a dotted Hydra key (``trainer.max_epochs``).
        value: its value.
        fix: a value that would work.
    """

    exit_code = 1


class RunInterrupted(SettingError):
    """Training stopped by a signal (SIGTERM: preemption, ``docker stop``) after saving
    ``last.ckpt``; exit status 143 (128 + SIGTERM), as the signal itself would give."""

    exit_code = 143
    status = "interrupted"  # in metrics.json


def literal(value: Any) -> str:
    """A value as a Hydra override writes it: ``true``, ``null``, ``0.1``, ``[1,8,8]``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(literal(v) for v in value) + "]"
    if isinstance(value, str) and value == "":
        return "''"
    return str(value)


def not_one_of(value: Any, choices: Sequence) -> str:
    """The refusal of a value that is not among ``choices``, with the closest as a hint."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"must be one of {', '.join(map(literal, choices))}{hint}"


def _missing_option(err: MissingConfigException) -> str | None:
    """A config group option that does not exist (``block=dbbb``), as a setting's refusal:
    ``block=dbbb: must be one of acb, dbb, ... (did you mean dbb?)``, naming the config file
    that asked for it when that is not the primary config; ``None`` for other missing files."""
    missing = err.missing_cfg_file or ""
    if not err.options or "/" not in missing:
        return None
    group, _, name = missing.rpartition("/")
    line = SettingError(not_one_of(name, err.options), group.replace("/", "."), name)
    where = re.match(r"In '([^']+)'", str(err))
    asked_by = f" (asked for by configs/{where.group(1)}.yaml)" if where and "/" in where.group(1) else ""  # fmt: skip
    return line.render(literal=literal) + asked_by


# --- one line per failure ---------------------------------------------------------------------

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def one_line(err: BaseException, folder_setting: str = "the output folder") -> str:
    """``err`` as one line: a :class:`ConfigError` as its rendering (the message of an error a
    DataLoader worker re-raised, not the worker's traceback); a full disk or a read-only
    folder as what to do about it (``folder_setting`` names the setting that moves the
    output); anything else with its type and a pointer to ``HYDRA_FULL_ERROR=1``."""
    os_error = _os_error(err)
    if os_error is not None:
        where = os_error.filename or "a file"
        if os_error.errno in DISK_FULL:
            return (
                f"no space left on the device writing {where}: free disk space, or set "
                f"{folder_setting} to a folder on another disk"
            )
        if os_error.errno in _READ_ONLY:
            return (
                f"cannot write {where} ({os_error.strerror}): make it writable, or set "
                f"{folder_setting} to a writable folder"
            )
    if isinstance(err, MissingConfigException) and _missing_option(err) is not None:
        return _missing_option(err)
    if isinstance(err, HydraException | OmegaConfBaseException):  # written for users, whole
        cause = err.__cause__
        text = str(err) + (f"; {first_line(str(cause))}" if isinstance(cause, OmegaConfBaseException) else "")  # fmt: skip
        return " ".join(text.split("Config search path:")[0].split())
    text = err.render(literal=literal) if isinstance(err, ConfigError) else str(err).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    if isinstance(err, ConfigError):
        return " ".join(text.split())
    return f"{type(err).__name__}: {first_line(text)} (HYDRA_FULL_ERROR=1 shows the traceback)"


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (itself, a cause, or a torch writer's message)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        text = str(seen)
        if "No space left on device" in text or "file write failed" in text:
            return OSError(errno.ENOSPC, "No space left on device", _quoted_file(text))
        seen = seen.__cause__ or seen.__context__
    return None


def _quoted_file(text: str) -> str | None:
    for word in text.split():
        if "/" in word:
            return word.strip("'\":,")
    return None


def report(prog: str, err: BaseException, folder_setting: str = "the output folder") -> int:
    """Prints ``err`` as ``<prog>: error: <one line>`` on stderr and returns its exit status
    (:attr:`SettingError.exit_code`, else 1). With ``HYDRA_FULL_ERROR=1`` the caller re-raises
    instead (see :func:`full_error`)."""
    print(f"{prog}: error: {one_line(err, folder_setting)}", file=sys.stderr, flush=True)
    return getattr(err, "exit_code", 1)


_ASKED = "REPSQUEEZE_HYDRA_FULL_ERROR"  # the user's HYDRA_FULL_ERROR, kept by run_main


def full_error() -> bool:
    """Whether the user asked for tracebacks (``HYDRA_FULL_ERROR=1``)."""
    return os.environ.get(_ASKED, os.environ.get("HYDRA_FULL_ERROR", "")) == "1"


def run_main(main: Callable[[], Any], prog: str, folder_setting: str) -> None:
    """Runs a ``@hydra.main`` function so that Hydra's own failures (an option or override it
    cannot compose, a run folder it cannot write) are one line and exit status 1 too: Hydra is
    told to raise them (``HYDRA_FULL_ERROR=1`` for Hydra; the user's own choice is kept for
    :func:`full_error`, also in the processes a DDP launch starts)."""
    os.environ.setdefault(_ASKED, os.environ.get("HYDRA_FULL_ERROR", ""))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as err:
        if full_error():
            raise
        sys.exit(report(prog, err, folder_setting))
