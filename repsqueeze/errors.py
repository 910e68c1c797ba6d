"""The library's one error family: :class:`ConfigError`, an argument or a file that cannot
work, named so that an entry point can print it as one line (see :mod:`repsqueeze.cli.errors`).

A leaf module: it imports nothing from the package, so anything may raise it without
pulling in the data pipeline or Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_UNSET = object()


class ConfigError(ValueError):
    """An argument that cannot work, or data that is not where (or not what) it should be.

    ``str(err)`` reads ``key=value: message; set key=fix`` (the parts that are known), in
    Python syntax; :meth:`render` writes the same with a prefix and another literal syntax,
    e.g. as the Hydra override ``data.download=true``.

    Args:
        message: what is wrong.
        key: the argument to change, or ``None`` when no argument is at fault (a bad file).
        value: the argument's current value.
        fix: a value of ``key`` that would work, when there is one.
    """

    def __init__(
        self, message: str, key: str | None = None, value: Any = _UNSET, fix: Any = _UNSET
    ) -> None:
        super().__init__(message)
        self.message, self.key, self.value, self.fix = message, key, value, fix

    def __reduce__(self) -> tuple:
        return type(self), (self.message, self.key, self.value, self.fix)

    def render(self, prefix: str = "", literal: Callable[[Any], str] = repr) -> str:
        """The message with ``key`` written as ``prefix + key`` and values through ``literal``."""
        head = tail = ""
        if self.key is not None:
            name = prefix + self.key
            head = f"{name}: " if self.value is _UNSET else f"{name}={literal(self.value)}: "
            if self.fix is not _UNSET:
                tail = f"; set {name}={literal(self.fix)}"
        return head + self.message + tail

    def __str__(self) -> str:
        return self.render()
