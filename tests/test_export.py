"""``repsqueeze.export``: deployed.pt round trip, verification, TorchScript/ONNX, measurements.

Every model here has its BatchNorm statistics randomized first, so a deployed form that
forgot to fold them would not pass for the training form.
"""

import time

import pytest
import torch
from helpers import randomize_bn
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

import repsqueeze as rs
from repsqueeze import export
from repsqueeze.models import create_model

BLOCKS = ["repvgg", "dbb"]
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
]


def _arch(block: str) -> dict:
    return {"name": "digits_net", "block": block, "num_classes": 10, "in_channels": 1}


def _pair(block: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A digits net in training form (BN randomized, eval mode) and its deployed copy."""
    net = create_model(**_arch(block)).eval()
    randomize_bn(net, torch.Generator().manual_seed(seed))
    return net, rs.deploy(net).eval()


def _inputs(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# --- deployed.pt -------------------------------------------------------------------------------
@pytest.mark.parametrize("block", BLOCKS)
def test_save_load_round_trip(tmp_path, block):
    net, deployed = _pair(block)
    path = tmp_path / "deployed.pt"
    export.save_deployed(deployed, path, _arch(block), extra={"note": "hello"})
    loaded = export.load_deployed(path)

    assert not loaded.training
    assert loaded.state_dict().keys() == deployed.state_dict().keys()
    x = _inputs(6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), deployed(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), net(x), rtol=1e-5, atol=1e-5)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == export.FORMAT
    assert payload["arch"] == _arch(block)
    assert payload["extra"] == {"note": "hello"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deployed.pt"]  # no temp file left


@pytest.mark.parametrize("block", BLOCKS)
def test_load_deployed_never_allocates_branches(tmp_path, monkeypatch, block):
    """Every parameter registered while loading is either the deployed one or on ``meta``."""
    _, deployed = _pair(block)
    export.save_deployed(deployed, tmp_path / "deployed.pt", _arch(block))
    allocated = []
    register = nn.Module.register_parameter

    def spy(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            allocated.append(param.numel())
        register(module, name, param)

    monkeypatch.setattr(nn.Module, "register_parameter", spy)
    loaded = export.load_deployed(tmp_path / "deployed.pt")
    monkeypatch.undo()

    assert sum(allocated) == export.count_params(deployed)
    assert export.count_params(loaded) == export.count_params(deployed)
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())


def test_load_deployed_refuses_a_wrong_format(tmp_path):
    _, deployed = _pair("repvgg")
    path = tmp_path / "deployed.pt"
    export.save_deployed(deployed, path, _arch("repvgg"))
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "format": "repsqueeze.deployed/0"}, tmp_path / "old.pt")
    torch.save(payload["state_dict"], tmp_path / "state_dict.pt")
    for name in ("old.pt", "state_dict.pt"):
        with pytest.raises(ValueError, match="not a repsqueeze deployed model"):
            export.load_deployed(tmp_path / name)


# --- verification --------------------------------------------------------------------------
@pytest.mark.parametrize("block", BLOCKS)
def test_verify_within_tolerance(block):
    net, deployed = _pair(block)
    report = export.verify(net, deployed, {"random": _inputs(8), "other": _inputs(3, seed=2)})
    assert report.keys() == {"random", "other"}
    for errors in report.values():
        assert errors.keys() == {"float32", "float64"}
        assert 0 <= errors["float64"] <= 1e-10
        assert 0 <= errors["float32"] <= 1e-5


def test_verify_names_input_and_dtype_of_a_tampered_weight():
    net, deployed = _pair("repvgg")
    with torch.no_grad():
        next(deployed.parameters()).view(-1)[0] += 0.5  # one weight of the stem convolution
    with pytest.raises(
        ValueError, match=r"on probe input in float32: relative error .* > tolerance"
    ):
        export.verify(net, deployed, {"probe": _inputs(4)})


def test_verify_float64_is_exact_and_tolerances_are_honoured():
    net, deployed = _pair("dbb")
    x = {"x": _inputs(4)}
    report = export.verify(net, deployed, x)
    assert report["x"]["float64"] < 1e-13
    with pytest.raises(ValueError, match="on x input in float64"):
        export.verify(net, deployed, x, tol64=-1.0)
    with pytest.raises(ValueError, match="on x input in float32"):
        export.verify(net, deployed, x, tol32=-1.0)


# --- TorchScript and ONNX --------------------------------------------------------------------
@pytest.mark.parametrize("block", BLOCKS)
def test_torchscript_and_onnx_match_pytorch(tmp_path, block):
    _, deployed = _pair(block)
    example = _inputs(1)
    export.to_torchscript(deployed, tmp_path / "model.ts", example)
    export.to_onnx(deployed, tmp_path / "model.onnx", example)
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    for batch in (1, 5):  # 5: the batch axis is dynamic, not the example's 1
        x = _inputs(batch, seed=batch)
        with torch.no_grad():
            expected = deployed(x)
            torch.testing.assert_close(scripted(x), expected, rtol=0, atol=1e-4)
        onnx_out = export.run_onnx(tmp_path / "model.onnx", x)
        assert onnx_out.shape == (batch, 10)
        torch.testing.assert_close(onnx_out, expected, rtol=0, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.ts"]


# --- atomic files ----------------------------------------------------------------------------
def test_atomic_path_writes_on_success(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    with export.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_path_leaves_nothing_when_the_body_raises(tmp_path):
    target = tmp_path / "file.txt"
    with pytest.raises(RuntimeError, match="boom"), export.atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), export.atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_save_deployed_failure_leaves_no_file(tmp_path):
    """A payload torch.save cannot write (a lambda in ``extra``) leaves neither file nor temp."""
    _, deployed = _pair("repvgg")
    with pytest.raises(Exception):  # noqa: B017 - pickling errors differ across versions
        export.save_deployed(deployed, tmp_path / "deployed.pt", _arch("repvgg"), {"f": lambda: 0})
    assert list(tmp_path.iterdir()) == []


# --- measurements ----------------------------------------------------------------------------
@given(
    batch=st.integers(1, 3),
    c_in_per_group=st.integers(1, 4),
    c_out_per_group=st.integers(1, 4),
    groups=st.integers(1, 3),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
)
def test_count_macs_of_a_conv_is_analytic(
    batch, c_in_per_group, c_out_per_group, groups, kernel, stride, padding, dilation, size
):
    out_size = [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, p, d, k, s in zip(size, padding, dilation, kernel, stride, strict=True)
    ]
    assume(min(out_size) >= 1)
    conv = nn.Conv2d(
        c_in_per_group * groups,
        c_out_per_group * groups,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )
    x = torch.randn(batch, c_in_per_group * groups, *size)
    expected = (
        batch
        * c_out_per_group
        * groups
        * out_size[0]
        * out_size[1]
        * c_in_per_group
        * kernel[0]
        * kernel[1]
    )
    assert export.count_macs(conv, x) == expected


def test_count_macs_of_a_linear_and_mode_is_restored():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Dropout(), nn.Linear(5, 2)).train()
    assert export.count_macs(model, torch.randn(3, 3, 4)) == 3 * (12 * 5 + 5 * 2)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("block", ["plain", "repvgg", "acb", "dbb", "mobileone", "expand_ck"])
def test_count_macs_deployed_not_above_training(block):
    net, deployed = _pair(block)
    x = _inputs(2)
    training_macs, deployed_macs = export.count_macs(net, x), export.count_macs(deployed, x)
    assert 0 < deployed_macs <= training_macs
    assert export.count_macs(deployed, x[:1]) * 2 == deployed_macs
    if block != "plain":
        assert deployed_macs < training_macs


def test_count_params():
    assert export.count_params(nn.Conv2d(3, 8, 3)) == 8 * 3 * 9 + 8
    assert export.count_params(nn.Conv2d(4, 8, (1, 3), groups=2, bias=False)) == 8 * 2 * 3
    assert export.count_params(nn.BatchNorm2d(5)) == 10  # running stats are buffers
    net, deployed = _pair("repvgg")
    assert export.count_params(net) == sum(p.numel() for p in net.parameters())
    assert export.count_params(deployed) < export.count_params(net)


def test_max_abs_diff():
    a = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    assert export.max_abs_diff(a, torch.tensor([1.0, -2.5, 3.25])) == pytest.approx(0.5)


def test_latency_ms_is_the_median_of_the_timed_calls_in_ms(monkeypatch):
    """On a fake clock: warm-up calls are not timed; the median, not the mean, in ms."""
    now, durations = [0.0], iter([5.0, 7.0, 0.004, 0.001, 0.100, 0.002, 0.003])  # seconds

    def call() -> None:
        now[0] += next(durations)

    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    assert export.latency_ms(call, repeats=5, warmup=2) == pytest.approx(3.0)
    assert next(durations, None) is None  # 2 + 5 calls, no more


def test_latency_ms_of_a_known_sleep():
    ms = export.latency_ms(lambda: time.sleep(0.005), repeats=3, warmup=1)
    assert 5.0 <= ms <= 100.0  # sleep never returns early; 20x slack for a busy machine
