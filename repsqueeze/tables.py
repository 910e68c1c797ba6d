"""One way to print a table: ``train.py``, ``deploy.py`` and the benchmarks all use it.

Built on ``tabulate``; numbers are formatted by :func:`fmt` so every table in the project
reads alike (thousands separators for counts, three decimals for ratios, scientific
notation for tiny errors).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tabulate import tabulate


def fmt(value: object) -> str:
    """A table cell: ``yes``/``NO`` for booleans, ``1,234`` for ints, 3 significant places
    (or scientific notation below 1e-3 and above 1e5) for floats, ``n/a`` for ``None``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3f}" if abs(value) < 100 else f"{value:,.1f}"
        return f"{value:.1e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(
    rows: Sequence[Mapping[str, object]] | Sequence[Sequence[object]],
    headers: Sequence[str] | None = None,
    markdown: bool = True,
) -> str:
    """Formats rows as a table.

    Args:
        rows: dicts (their keys, in the first row's order, are the headers) or sequences
            (then ``headers`` names the columns).
        headers: column names for sequence rows; ignored for dict rows.
        markdown: a GitHub-markdown table (README, results files); ``False`` gives a plain
            aligned table for the terminal.

    Returns:
        The table, without a trailing newline; ``"(no rows)"`` when ``rows`` is empty.
    """
    if not rows:
        return "(no rows)"
    if isinstance(rows[0], Mapping):
        headers = list(rows[0])
        cells = [[fmt(r.get(k)) for k in headers] for r in rows]
    else:
        cells = [[fmt(v) for v in r] for r in rows]
        headers = list(headers or [])
    style = "github" if markdown else "simple"
    return tabulate(cells, headers=headers, tablefmt=style, disable_numparse=True)
