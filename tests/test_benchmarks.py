"""Smoke test of ``benchmarks/run.py --quick``: every section runs and its figures are sane.

The script is run in-process (``benchmarks/`` is not a package, so it is loaded from its
file). About 30 s on 2 CPU cores, most of it the latency section (repvgg_a0 at 64x64).
"""

import importlib.util
import json
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


def test_quick_run_latency_ratios_are_against_the_plain_twin_measured_alongside(quick_run):
    rows = quick_run[0]["latency"]
    for model, batch in {(r["model"], r["batch"]) for r in rows}:
        group = {r["form"]: r for r in rows if (r["model"], r["batch"]) == (model, batch)}
        plain = group["hand-written plain"]
        for row in group.values():
            assert row["vs plain"] == pytest.approx(row["ms"] / plain["ms"], rel=1e-12), row
        deployed, training = group["deployed"], group["training form"]
        assert deployed["params"] == plain["params"] < training["params"]
        # the same convolutions, timed interleaved: within 3x either way even on a busy CPU
        assert 1 / 3 <= deployed["vs plain"] <= 3, group
        if "timm repvgg_a0 (reparameterized)" in group:
            timm_row = group["timm repvgg_a0 (reparameterized)"]
            assert timm_row["params"] == deployed["params"]
            assert 1 / 3 <= timm_row["vs plain"] <= 3, group


def test_quick_run_training_memory_and_time_ratios(quick_run):
    rows = {r["variant"]: r for r in quick_run[0]["training"]}
    plain, chain, online = (
        rows[k] for k in ("plain (ConvBN)", "expand_ck chain", "expand_ck online")
    )
    for row in rows.values():
        assert row["time vs plain"] == pytest.approx(row["step ms"] / plain["step ms"], rel=1e-12)
        ratio = row["activations MiB"] / plain["activations MiB"]
        assert row["memory vs plain"] == pytest.approx(ratio, rel=1e-12)
        assert 1 / 20 <= row["time vs plain"] <= 20, row
    # saved activations are counted, not timed: the chain keeps its hidden activations,
    # online mode only the composed convolution's input
    assert chain["activations MiB"] > 1.5 * plain["activations MiB"]
    assert online["activations MiB"] < chain["activations MiB"] / 1.5
    assert chain["params"] == online["params"] > plain["params"]


def test_quick_run_squeeze_counts_every_block(quick_run):
    (row,) = quick_run[0]["squeeze"]
    assert row["blocks"] == 1 + 2 + 4 + 14 + 1  # RepVGG-A0: stem and stages of 2, 4, 14, 1
    assert 0 < row["squeeze s"] < 60


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
