"""Deploy as cheap as its arithmetic, and keeping what the model was: memory format, dtype,
device; no deep copy of what it replaces; the structure decided once per kind and shape;
and the deploy-time benchmark table running end to end on a tiny case."""

import copy

import pytest
import torch
from helpers import assert_equivalent, randomize_bn
from torch import nn

import repsqueeze as rs
from benchmarks import deploy_time, mirror
from repsqueeze.core import compose, squeeze
from repsqueeze.models import create_model
from repsqueeze.zoo import BLOCKS, make_block

KINDS = list(BLOCKS)


def _model(kind: str, seed: int = 0) -> nn.Module:
    """Two blocks of a kind (the second strided, with groups where the kind allows)."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if kind.startswith("expand") else 2
    model = nn.Sequential(
        make_block(kind, 3, 8), nn.ReLU(), make_block(kind, 8, 8, stride=2, groups=groups)
    )
    return randomize_bn(model, gen).eval()


def _convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_stays_channels_last(kind):
    model = _model(kind).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last)
    deployed = rs.deploy(model)
    for conv in _convs(deployed):
        if conv.kernel_size != (1, 1):  # a 1x1 kernel is both formats at once
            assert not conv.weight.is_contiguous()
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_equivalent(deployed(x), model(x), 1e-5)
    inplace = rs.deploy(copy.deepcopy(model), inplace=True)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in _convs(inplace))


def test_channels_last_read_from_pointwise_kernels_too():
    block = rs.SqueezableBlock(nn.Conv2d(3, 4, 1), nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4))
    conv = block.eval().to(memory_format=torch.channels_last).squeeze()  # 1x1 -> 3x3
    assert not conv.weight.is_contiguous()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_3d_and_contiguous_are_kept():
    block = make_block("dbb", 4, 6, dims=3).eval()
    block = block.to(memory_format=torch.channels_last_3d)
    conv = block.squeeze()
    assert not conv.weight.is_contiguous()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert make_block("dbb", 4, 6).eval().squeeze().weight.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dtype_and_device_are_kept(dtype):
    model = _model("dbb").to(dtype)
    deployed = rs.deploy(model)
    for conv in _convs(deployed):
        assert conv.weight.dtype == conv.bias.dtype == dtype
        assert conv.weight.device == conv.bias.device == torch.device("cpu")
    if dtype == torch.float64:
        x = torch.randn(2, 3, 9, 9, dtype=dtype)
        with torch.no_grad():
            assert_equivalent(deployed(x), model(x), 1e-12)


def test_deployed_copy_shares_nothing_and_copies_no_branch(monkeypatch):
    model = _model("repvgg")
    reference = copy.deepcopy(model)
    copied: list[type] = []
    reduce = nn.Module.__reduce_ex__  # how copy.deepcopy copies a module

    def counting(self, protocol):
        copied.append(type(self))
        return reduce(self, protocol)

    monkeypatch.setattr(nn.Module, "__reduce_ex__", counting)
    deployed = rs.deploy(model)
    monkeypatch.undo()
    assert nn.BatchNorm2d not in copied  # the branches were never copied
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in deployed.parameters()}
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the model is untouched
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert_equivalent(deployed(x), model(x), 1e-5)


def test_squeeze_never_shares_memory_with_the_block():
    block = make_block("plain", 3, 4).double().eval()  # float64: no cast to copy
    conv = block.squeeze()
    params = {p.data_ptr() for p in block.parameters()}
    assert not params & {conv.weight.data_ptr(), conv.bias.data_ptr()}


def test_layout_decided_once_per_kind_and_shape(monkeypatch):
    calls = []
    term_layout = compose.term_layout

    def counting(*args):
        calls.append(1)
        return term_layout(*args)

    squeeze._LAYOUTS.clear()
    monkeypatch.setattr(compose, "term_layout", counting)
    model = create_model("resnet20_cifar", block="repvgg", num_classes=10).eval()
    shapes = {squeeze.structure_key(m) for m in model.modules() if isinstance(m, rs.Squeezable)}
    calls.clear()
    rs.deploy(model)
    assert len(calls) <= len(shapes) < sum(isinstance(m, rs.Squeezable) for m in model.modules())


def test_refused_deploy_changes_nothing_in_place():
    model = _model("repvgg")
    blocks_ = [m for m in model.modules() if isinstance(m, rs.Squeezable)]
    with torch.no_grad():
        blocks_[-1].branches[0][1].running_var[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        rs.deploy(model, inplace=True)
    assert not any(b.deployed for b in blocks_)  # all checked before any block changed


def test_deploy_time_table_runs_on_a_tiny_case(tmp_path, monkeypatch):
    bench = deploy_time
    monkeypatch.setattr(mirror, "MIRROR", tmp_path / "absent")
    monkeypatch.setattr(bench, "variants", _tiny_variants(bench))
    results = bench.run(quick=True)
    bench.write(results, tmp_path / "r")
    rows = {r["variant"]: r for r in results["deploy"]}
    assert {"repsqueeze repvgg", "repsqueeze repvgg (copy)", "rs.deploy", "rs.contract"} <= {
        v.split(" (expanded")[0] for v in rows
    }
    assert all(r["s"] > 0 for r in rows.values())
    assert any("skipped" in n for n in results["notes"])
    assert "| variant" in (tmp_path / "r.md").read_text()


def _tiny_variants(bench):
    """The table's own variants with the repsqueeze rows only (timm's model takes seconds
    to build)."""
    real = bench.variants

    def tiny(*args, **kwargs):
        rows, notes = real(*args, **kwargs)
        return {k: v for k, v in rows.items() if k.startswith("repsqueeze")}, notes

    return tiny
