"""Writing a benchmark's results: strict JSON, markdown tables, sections kept from an earlier
run (``--merge``), and the PNG charts."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from repsqueeze.tables import table


def notes_md(notes: list[str]) -> str:
    return "".join(f"\n_{note}_\n" for note in notes)


def kept_sections(out: Path, rerun: list[str], titles: dict[str, str]) -> tuple[dict, dict, dict]:
    """``--merge``: the sections of ``OUT.json`` not rerun now.

    Returns:
        Per kept section its settings (environment, title, notes), its rows, and its
        markdown (the title, a line saying when and how it ran, the table).
    """
    path = out.with_suffix(".json")
    old = json.loads(path.read_text()) if path.is_file() else {}
    env = old.get("environment", {})
    settings = {k: v for k, v in env.items() if k not in ("kept", "seconds")}
    kept, rows, chunks = {}, {}, {}
    for key in titles:
        if key not in old or key in rerun:
            continue
        previous = env.get("kept", {}).get(key, {})
        kept[key] = {
            "environment": previous.get("environment", settings),
            "title": previous.get("title") or _markdown_title(path, titles[key]),
            "notes": previous.get("notes", old.get("notes", {}).get(key, [])),
        }
        rows[key] = old[key]
        ran = kept[key]["environment"]
        when = f"{ran.get('threads')} threads, {ran.get('date')}, `{ran.get('command')}`"
        chunks[key] = (
            f"\n## {kept[key]['title']}\n\n_Kept from an earlier run ({when})._\n\n"
            f"{table(old[key])}\n{notes_md(kept[key]['notes'])}"
        )
    return kept, rows, chunks


def _markdown_title(json_path: Path, title: str) -> str:
    """The heading a section had in the markdown file written with the JSON."""
    md = json_path.with_suffix(".md")
    lines = md.read_text().splitlines() if md.is_file() else []
    prefix = f"## {title}"
    return next((line[3:] for line in lines if line.startswith(prefix)), title)


def write(results: dict, md: list[str], out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(finite(results), indent=2, allow_nan=False))
    out.with_suffix(".md").write_text("".join(md))


def finite(v: object) -> object:
    """Strict JSON: non-finite figures become strings ("nan", "inf")."""
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [finite(x) for x in v]
    return str(v) if isinstance(v, float) and not math.isfinite(v) else v


def plot(results: dict, out: Path) -> list[Path]:
    """PNG charts next to ``out``: ``OUT_training.png`` (time and memory vs plain per
    variant) and ``OUT_latency.png`` (each form vs the hand-written plain network)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no charts (pip install -e .[dev])", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = results.get("environment", {})
    where = env.get("gpu") or f"CPU, {env.get('threads', '?')} threads"
    written = []
    training = [r for r in results.get("training", []) if _number(r.get("time vs plain"))]
    if training:
        groups = sorted({(r.get("precision", "fp32"), r.get("batch", 64)) for r in training})
        variants = list(dict.fromkeys(r["variant"] for r in training))
        fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(variants) * len(groups) ** 0.5 + 2))
        for ax, key, name in zip(axes, ("time vs plain", "memory vs plain"), ("step time", "memory"), strict=True):  # fmt: skip
            _bars(ax, training, variants, groups, key)
            ax.set_title(f"Training {name} / plain ({where})")
        fig.tight_layout()
        written.append(_save(fig, out, "training"))
    latency = [r for r in results.get("latency", []) if _number(r.get("vs plain"))]
    if latency:
        forms = list(dict.fromkeys(r["form"] for r in latency))
        groups = list(dict.fromkeys((r["model"], r["batch"]) for r in latency))
        fig, ax = plt.subplots(figsize=(11, 0.35 * len(forms) * len(groups) ** 0.5 + 2))
        rows = [{**r, "variant": r["form"], "precision": r["model"]} for r in latency]
        _bars(ax, rows, forms, groups, "vs plain")
        ax.set_title(f"Inference latency / hand-written plain ({where})")
        fig.tight_layout()
        written.append(_save(fig, out, "latency"))
    plt.close("all")
    return written


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bars(ax, rows: list[dict], variants: list[str], groups: list, key: str) -> None:
    """Horizontal bars, labelled with their value: one row per variant, one bar per group
    ``(precision or model, batch)``, a line at 1 (plain); log scale when ratios span > 3x."""
    from matplotlib.ticker import FuncFormatter

    height = 0.8 / len(groups)
    top = 1.0
    for g, group in enumerate(groups):
        values = {
            r["variant"]: r[key]
            for r in rows
            if (r.get("precision", "fp32"), r.get("batch", 64)) == group and _number(r.get(key))
        }
        ys = [i + g * height for i, v in enumerate(variants) if v in values]
        label = f"{group[0]}, batch {group[1]}"
        bars = ax.barh(ys, [values[v] for v in variants if v in values], height, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        top = max(top, *values.values()) if values else top
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(variants))], variants)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    if top > 3:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlim(right=top * (1.5 if top > 3 else 1.12))
    ax.set_xlabel("ratio to plain" + (" (log scale)" if top > 3 else ""))
    if len(groups) > 1:
        ax.legend(fontsize="small", loc="lower right")


def _save(fig, out: Path, name: str) -> Path:
    path = out.parent / f"{out.name}_{name}.png"
    fig.savefig(path, dpi=110)
    return path
