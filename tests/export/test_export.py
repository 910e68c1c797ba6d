"""``repsqueeze.export``: deployed.pt round trip, verification, torch.export/ONNX, measurements.

Every model here has its BatchNorm statistics randomized first, so a deployed form that
forgot to fold them would not pass for the training form.
"""

import math
import sys

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
    assert payload["geometry"] == export.conv_geometry(deployed)
    assert payload["geometry"]["stages.1.0.0.conv"]["stride"] == [2, 2]
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


def _payload(tmp_path, model: nn.Module, arch: dict) -> dict:
    export.save_deployed(model, tmp_path / "deployed.pt", arch)
    return torch.load(tmp_path / "deployed.pt", weights_only=True)


def _edited(tmp_path, payload: dict, name: str = "edited.pt") -> str:
    torch.save(payload, tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    ("field", "value"), [("padding_mode", "reflect"), ("dilation", [2, 2]), ("stride", [2, 2])]
)
def test_load_refuses_a_hand_edited_geometry(tmp_path, field, value):
    """The state dict's shapes fit either way; only the stored geometry tells the difference."""
    _, deployed = _pair("repvgg")
    payload = _payload(tmp_path, deployed, _arch("repvgg"))
    payload["geometry"]["stages.0.0.0.conv"][field] = value
    with pytest.raises(
        ValueError, match=rf"rebuild the stored model: layer 'stages.0.0.0.conv': {field} is"
    ):
        export.load_deployed(_edited(tmp_path, payload))


def test_load_refuses_a_hand_edited_arch(tmp_path):
    _, deployed = _pair("repvgg")
    payload = _payload(tmp_path, deployed, _arch("repvgg"))
    payload["arch"]["padding_mode"] = "reflect"
    with pytest.raises(
        ValueError, match="layer 'stem.0.conv': padding_mode is 'zeros', rebuilt 'reflect'"
    ):
        export.load_deployed(_edited(tmp_path, payload))


def test_save_refuses_an_arch_that_rebuilds_another_model(tmp_path):
    """A model built with reflect padding, saved with a config that rebuilds zeros padding:
    it would reload with other outputs, so it is refused at save time."""
    net = create_model(**_arch("repvgg"), padding_mode="reflect").eval()
    randomize_bn(net, torch.Generator().manual_seed(0))
    deployed = rs.deploy(net)
    with pytest.raises(
        ValueError,
        match="does not rebuild this model: layer 'stem.0.conv': padding_mode is 'reflect'",
    ):
        export.save_deployed(deployed, tmp_path / "deployed.pt", _arch("repvgg"))
    with pytest.raises(ValueError, match=r"does not rebuild this model: layer '.*' \(Conv2d\) is"):
        export.save_deployed(
            deployed, tmp_path / "deployed.pt", _arch("repvgg") | {"name": "resnet20_cifar"}
        )
    assert list(tmp_path.iterdir()) == []
    arch = _arch("repvgg") | {"padding_mode": "reflect"}
    export.save_deployed(deployed, tmp_path / "deployed.pt", arch)
    x = _inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(export.load_deployed(tmp_path / "deployed.pt")(x), net(x))


def test_non_finite_weights_are_refused(tmp_path):
    _, deployed = _pair("repvgg")
    payload = _payload(tmp_path, deployed, _arch("repvgg"))
    payload["state_dict"]["head.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="head.weight holds 1 NaN/Inf"):
        export.load_deployed(_edited(tmp_path, payload))
    with torch.no_grad():
        deployed.head.bias[1] = float("-inf")
    with pytest.raises(ValueError, match="save_deployed.*head.bias holds 1 NaN/Inf"):
        export.save_deployed(deployed, tmp_path / "new.pt", _arch("repvgg"))
    assert not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("key", ["arch", "state_dict", "geometry"])
def test_a_missing_key_is_a_clear_error(tmp_path, key):
    _, deployed = _pair("repvgg")
    payload = _payload(tmp_path, deployed, _arch("repvgg"))
    del payload[key]
    with pytest.raises(ValueError, match=f"corrupt deployed model: no '{key}' dict in the file"):
        export.load_deployed(_edited(tmp_path, payload))


def test_a_file_without_geometry_loads_with_a_warning(tmp_path):
    """Format 1 (before geometry was stored) still loads, unchecked, and says so."""
    net, deployed = _pair("repvgg")
    payload = _payload(tmp_path, deployed, _arch("repvgg"))
    del payload["geometry"]
    payload["format"] = export.FORMAT_WITHOUT_GEOMETRY
    with pytest.warns(UserWarning, match="written before layer geometry was stored"):
        loaded = export.load_deployed(_edited(tmp_path, payload))
    x = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), deployed(x), rtol=0, atol=0)


def test_load_names_weights_that_do_not_fit(tmp_path):
    _, deployed = _pair("repvgg")
    payload = _payload(tmp_path, deployed, _arch("repvgg"))
    payload["state_dict"]["head.weight"] = payload["state_dict"]["head.weight"][:4]
    with pytest.raises(
        ValueError, match=r"weights do not fit .*head.weight \(4, 64\) vs \(10, 64\)"
    ):
        export.load_deployed(_edited(tmp_path, payload))


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


# --- torch.export, ONNX and TorchScript ------------------------------------------------------
def test_pt2_and_onnx_match_pytorch(tmp_path, monkeypatch):
    """One ``torch.export`` program, saved as model.pt2 and translated to ONNX; both run at
    batch sizes the example never had (1 included). A program given to ``to_pt2`` is saved
    as it is, not exported again."""
    _, deployed = _pair("dbb")
    program = export.to_pt2(deployed, tmp_path / "first.pt2", _inputs(1))
    monkeypatch.setattr(export.formats, "export_program", lambda *a: pytest.fail("exported twice"))
    assert export.to_pt2(program, tmp_path / "model.pt2", _inputs(1)) is program
    (tmp_path / "first.pt2").unlink()
    export.to_onnx(program, tmp_path / "model.onnx", _inputs(1))
    reloaded = export.load_pt2(tmp_path / "model.pt2")
    for batch in (1, 5):
        x = _inputs(batch, seed=batch)
        with torch.no_grad():
            expected = deployed(x)
            torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-5)
        onnx_out = export.run_onnx(tmp_path / "model.onnx", x)
        assert onnx_out.shape == (batch, 10)
        torch.testing.assert_close(onnx_out, expected, rtol=0, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt2"]


def test_torchscript_matches_pytorch(tmp_path):
    _, deployed = _pair("repvgg")
    export.to_torchscript(deployed, tmp_path / "model.ts", _inputs(1))
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    x = _inputs(5)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), deployed(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("missing", export.ONNX_MODULES)
def test_require_onnx_names_the_extra(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'repsqueeze\[export\]'") as info:
        export.require_onnx()
    assert info.value.name == missing
    with pytest.raises(ModuleNotFoundError, match="onnx=false"):
        export.run_onnx("model.onnx", _inputs(1))


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
def _hand_counted_macs(model: nn.Module, x: torch.Tensor) -> int:
    """The counter export.count_macs had before FlopCounterMode (an independent oracle):
    conv and linear modules from their outputs, a training-form block layer by layer with
    :func:`repsqueeze.core.cost.node_macs` (each layer on its own, unpadded, output size)."""
    from repsqueeze.core.blocks import Squeezable
    from repsqueeze.core.cost import node_macs

    total, inside = 0.0, set()
    for m in model.modules():
        if isinstance(m, Squeezable) and not m.deployed:
            inside.update(id(c) for c in m.modules() if c is not m)

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, Squeezable):
            total += inp[0].shape[0] * node_macs(m, tuple(map(float, inp[0].shape[2:])), 2)[0]
        elif isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)
        else:
            total += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if id(m) not in inside
        and (isinstance(m, (nn.Conv2d, nn.Linear)) or isinstance(m, Squeezable) and not m.deployed)
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return int(total)


@pytest.mark.parametrize("block", ["plain", "repvgg", "acb", "dbb", "mobileone", "expand_ck"])
def test_count_macs_against_the_hand_written_counter(block):
    """Equal to the old layer-by-layer counter for every kind, DBB's training form included:
    its 1x1 -> BN chains run on the interior only (BN-and-pad fills the border), so no
    convolution runs over the padded border."""
    net, deployed = _pair(block)
    x = _inputs(2)
    training_macs, deployed_macs = export.count_macs(net, x), export.count_macs(deployed, x)
    assert deployed_macs == _hand_counted_macs(deployed, x)
    assert training_macs == _hand_counted_macs(net, x)
    plain, _ = _pair("plain")
    assert deployed_macs == export.count_macs(plain, x)  # one k x k conv per block
    assert export.count_macs(deployed, x[:1]) * 2 == deployed_macs


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
