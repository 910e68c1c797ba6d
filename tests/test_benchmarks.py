"""Smoke test of ``benchmarks/run.py --quick``: every section runs and its figures are sane.

The script is run in-process (``benchmarks/`` is not a package, so it is loaded from its
file). About 30 s on 2 CPU cores, most of it the latency section (repvgg_a0 at 64x64).
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("latency", "training", "squeeze", "exactness", "accuracy")


def _load_benchmarks():
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """``main(["--quick", ...])`` once; torch's thread count and RNG restored after."""
    out = tmp_path_factory.mktemp("bench") / "r"
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        results = _load_benchmarks().main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    return results, out


def test_quick_run_writes_json_and_markdown(quick_run):
    results, out = quick_run
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    assert json_path.is_file() and md_path.is_file()
    on_disk = json.loads(json_path.read_text())
    assert set(SECTIONS) <= set(on_disk)
    assert on_disk["environment"]["quick"] is True
    for key in SECTIONS:
        assert results[key], f"section {key} has no rows"
        assert len(on_disk[key]) == len(results[key])
    markdown = md_path.read_text()
    assert markdown.count("\n## ") == len(SECTIONS)
    assert "(no rows)" not in markdown


def test_quick_run_exactness_is_within_tolerance(quick_run):
    rows = quick_run[0]["exactness"]
    assert {r["block"] for r in rows} == set(_load_benchmarks().KINDS)
    for row in rows:
        assert 0 <= row["float64"] <= 1e-10, row
        assert 0 <= row["float32"] <= 1e-5, row


def test_quick_run_accuracy_deployed_equals_training(quick_run):
    for row in quick_run[0]["accuracy"]:
        assert row["deployed == training"] is True, row
        assert 0 <= row["test acc mean"] <= 1
        assert row["params (deployed)"] < row["params (train)"], row


def test_quick_run_ratios_are_positive_and_finite(quick_run):
    results = quick_run[0]
    for row in results["latency"]:
        assert math.isfinite(row["vs plain"]) and row["vs plain"] > 0, row
        assert row["ms"] > 0
    plain = [r for r in results["latency"] if r["form"] == "hand-written plain"]
    assert plain and all(r["vs plain"] == 1.0 for r in plain)
    for row in results["training"]:
        assert math.isfinite(row["time vs plain"]) and row["time vs plain"] > 0, row
        assert math.isfinite(row["memory vs plain"]) and row["memory vs plain"] > 0, row
    for row in results["squeeze"]:
        assert row["blocks"] > 0 and row["squeeze s"] > 0


def test_non_finite_figures_are_written_as_strict_json(tmp_path, monkeypatch):
    """``_json_default`` is meant to write NaN/inf as strings, but ``json.dumps`` never calls
    ``default`` for floats: the file gets bare ``NaN``/``Infinity``, which is not JSON."""
    bench = _load_benchmarks()
    rows = [{"ratio": float("nan"), "ms": float("inf")}]
    monkeypatch.setitem(bench.SECTIONS, "fake", ("Fake", lambda args: rows))
    threads = torch.get_num_threads()
    try:
        bench.main(["--only", "fake", "--out", str(tmp_path / "r")])
    finally:
        torch.set_num_threads(threads)

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    on_disk = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert on_disk["fake"] == [{"ratio": "nan", "ms": "inf"}]
