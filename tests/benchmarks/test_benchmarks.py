"""Smoke test of ``benchmarks/run.py --quick``: every section runs and its figures are sane;
the charts, ``--plot-only``, the fairness of the latency comparison (same weights, module
calls), and the OREPA-style floor against an explicit three-branch oracle.

The benchmarks run in-process, imported as the ``benchmarks`` package. About 40 s on 2 CPU cores, most of it the latency section (repvgg_a0 at 64x64).
"""

import json
import os
from pathlib import Path

import pytest
import torch

import repsqueeze as rs
from benchmarks import common, floor, latency, mirror, peers, run, training
from repsqueeze.export import count_params

ROOT = Path(__file__).resolve().parents[2]
MIRROR = Path(os.environ.get("REPSQUEEZE_MIRROR", "/work/.mirror"))  # as benchmarks/mirror.py
SECTIONS = ("latency", "training", "squeeze", "exactness", "accuracy")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """``main(["--quick", "--threads", "1", ...])`` once; torch's thread count and RNG
    restored after."""
    out = tmp_path_factory.mktemp("bench") / "r"
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    try:
        # one thread: a busy machine stalls torch's 2-thread pool for hundreds of ms a call,
        # which swamps the ratios of these small forwards
        results = run.main(["--quick", "--threads", "1", "--out", str(out)])
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
    assert {r["block"] for r in rows} == set(common.KINDS)
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


def test_quick_run_latency_forms_differ_only_in_module_calls(quick_run):
    """The unwrapped model and the hand-written twin with the model's nesting make the same
    module calls; the wrapped deployed model adds exactly one call per block."""
    blocks = sum(
        isinstance(m, rs.Squeezable) for m in rs.create_model("repvgg_a0", block="repvgg").modules()
    )
    for (model, batch), rows in _group(quick_run[0]["latency"]).items():
        calls = {r["form"]: r["module calls"] for r in rows}
        nested = calls[f"{common.PLAIN} (model's nesting)"]
        assert calls["deployed, unwrap=True"] == nested, (model, batch)
        assert calls["deployed"] == nested + blocks, (model, batch)
        assert calls[common.PLAIN] < nested  # flat: no unit/stage containers


def _group(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"]), []).append(r)
    return groups


def test_quick_run_writes_charts_and_plot_only_redraws_them(quick_run):
    results, out = quick_run
    pngs = [out.parent / f"{out.name}_{name}.png" for name in ("training", "latency")]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        png.unlink()
    threads = torch.get_num_threads()
    try:
        run.main(["--plot-only", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert all(png.is_file() and png.stat().st_size > 1000 for png in pngs)


def test_quick_never_writes_the_committed_results():
    for device in ("cpu", "cuda"):
        out = run.default_out(device, quick=True)
        assert ROOT not in out.parents, out
        assert run.default_out(device, quick=False).parent == ROOT / "benchmarks"
    assert run.default_out("cuda", quick=False).name == "results_cuda"


@torch.no_grad()
def test_plain_twins_hold_the_deployed_weights():
    model = common.randomize_bn(rs.create_model("repvgg_a0", block="acb", num_classes=7))
    unwrapped = rs.deploy(model.eval(), unwrap=True)
    flat, nested = latency.plain_twins(unwrapped, 7)
    x = torch.randn(2, 3, 32, 32)
    expected = unwrapped(x)
    torch.testing.assert_close(nested.eval()(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(flat.eval()(x), expected, rtol=1e-6, atol=1e-6)


def test_floor_block_equals_its_three_branches():
    """The four-op kernel composition equals running the 3x3, 1x1 and identity branches
    with their channel scales separately (float64), then the BatchNorm."""
    block = floor.FloorRepVGGBlock(6, 6, 1).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (block.s3, block.s1, block.s_id):
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5)
    x = torch.randn(2, 6, 9, 11, generator=gen, dtype=torch.float64)
    s = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    branches = (
        torch.nn.functional.conv2d(x, block.w3, padding=1) * s(block.s3)
        + torch.nn.functional.conv2d(x, block.w1) * s(block.s1)
        + x * s(block.s_id)
    )
    torch.testing.assert_close(block(x), block.bn(branches), rtol=1e-12, atol=1e-12)
    net = floor.FloorRepVGG(num_classes=5, widths=(8, 8, 16, 16, 32), depths=(1, 2, 2, 2, 1))
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    strided = floor.FloorRepVGGBlock(6, 8, 2)
    assert strided.s_id is None and strided(torch.randn(1, 6, 9, 9)).shape == (1, 8, 5, 5)


def test_gpu_training_variants_cover_every_kind_and_mode():
    labels = list(training.training_variants("repvgg_a0", quick=False, gpu=True))
    for kind in common.KINDS[1:]:
        rows = 3 if kind == "dbb" else 2  # chain, online; DBB's chain also recomputed
        assert sum(label.startswith(f"{kind} ") for label in labels) == rows, (kind, labels)
    assert "dbb chain, recompute" in labels
    assert "floor: hand-written OREPA-style" in labels
    assert "timm repvgg_a0 training form" in labels
    assert set(training.COMPILED.values()) <= set(labels)


def test_non_finite_figures_are_written_as_strict_json(tmp_path, monkeypatch):
    """``_json_default`` is meant to write NaN/inf as strings, but ``json.dumps`` never calls
    ``default`` for floats: the file gets bare ``NaN``/``Infinity``, which is not JSON."""
    rows = [{"ratio": float("nan"), "ms": float("inf")}]
    monkeypatch.setitem(run.SECTIONS, "fake", ("Fake", lambda args: rows))
    threads = torch.get_num_threads()
    try:
        run.main(["--only", "fake", "--out", str(tmp_path / "r")])
    finally:
        torch.set_num_threads(threads)

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    on_disk = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert on_disk["fake"] == [{"ratio": "nan", "ms": "inf"}]


def test_peer_blocks_take_the_place_of_every_3x3_conv_bn_like_for_like(monkeypatch, tmp_path):
    """timm's blocks (installed) swap in for each 3x3 ConvBN of the same network, with the
    parameters of our block of that kind; an official block without a fetched copy is left
    out with a note naming where it was looked for."""
    monkeypatch.setattr(mirror, "MIRROR", tmp_path)
    variants, notes = peers.peer_variants("resnet20_cifar", 10)
    assert len(notes) == len(peers.OFFICIAL)
    assert all(str(tmp_path) in note for note in notes)
    timm_net = variants["repvgg"]["timm RepVggBlock"]()
    ours = rs.create_model("resnet20_cifar", block="repvgg")
    assert count_params(timm_net) == count_params(ours)
    assert not any(isinstance(m, rs.ConvBN) and m.layers[0].kernel_size == (3, 3) for m in timm_net.modules())  # fmt: skip
    assert timm_net(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.skipif(
    not (MIRROR / "DingXiaoH+DiverseBranchBlock").is_dir(),
    reason="no fetched copy of DingXiaoH/DiverseBranchBlock",
)
def test_official_dbb_loads_from_its_fetched_copy_with_our_parameter_count():
    variants, _ = peers.peer_variants("resnet20_cifar", 10)
    official = variants["dbb"]["official DBB (DingXiaoH/DiverseBranchBlock)"]()
    ours = rs.create_model("resnet20_cifar", block="dbb")
    assert count_params(official) == count_params(ours)
    assert official(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_merge_reruns_some_sections_and_keeps_the_others_with_their_settings(tmp_path, monkeypatch):
    monkeypatch.setitem(run.SECTIONS, "one", ("One", lambda args: [{"x": 1.0}]))
    monkeypatch.setitem(run.SECTIONS, "two", ("Two", lambda args: [{"y": 2.0}]))
    out = str(tmp_path / "r")
    threads = torch.get_num_threads()
    try:
        run.main(["--only", "one,two", "--threads", "2", "--out", out])
        monkeypatch.setitem(run.SECTIONS, "one", ("One", lambda args: [{"x": 3.0}]))
        run.main(["--only", "one", "--threads", "1", "--out", out, "--merge"])
    finally:
        torch.set_num_threads(threads)
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk["one"] == [{"x": 3.0}] and on_disk["two"] == [{"y": 2.0}]
    assert on_disk["environment"]["threads"] == 1
    assert on_disk["environment"]["kept"]["two"]["environment"]["threads"] == 2
    markdown = (tmp_path / "r.md").read_text()
    assert markdown.index("## One") < markdown.index("## Two")  # the sections' order
    assert "_Kept from an earlier run (2 threads" in markdown.split("## Two")[1]
    assert "Kept" not in markdown.split("## Two")[0]
