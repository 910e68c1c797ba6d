"""Every refusal: the exception type, the layer it names (position and class) and the rule;
and what must not be refused (a float16 composite that fits, the meta device)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
from helpers import assert_equivalent, naive
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs

pytestmark = pytest.mark.usefixtures("single_thread")


def _raises(exc: type[Exception], *fragments: str):
    """``pytest.raises`` that checks each fragment appears literally in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# --- non-linear layers -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer",
    [
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.MaxPool2d(2),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.LayerNorm(4),
        nn.Linear(4, 4),
        nn.ConvTranspose2d(4, 4, 3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_nonlinear_layer_in_chain_is_a_type_error(layer):
    name = type(layer).__name__
    with _raises(TypeError, f"layers.1 ({name})"):
        rs.SqueezableBlock(nn.Conv2d(3, 4, 3), layer, nn.Conv2d(4, 4, 1))


def test_nonlinear_layer_as_first_layer():
    with _raises(TypeError, "layers.0 (ReLU)"):
        rs.SqueezableBlock(nn.ReLU(), nn.Conv2d(3, 4, 3))


def test_nonlinear_layer_in_nested_sequential_names_the_full_path():
    with _raises(TypeError, "layers.1.2 (ReLU)"):
        rs.SqueezableBlock(
            nn.Conv2d(3, 4, 3),
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()),
        )


def test_nonlinear_branch_in_parallel():
    with _raises(TypeError, "branches.1 (Dropout)"):
        rs.Parallel(nn.Conv2d(3, 3, 3, padding=1), nn.Dropout())
    with _raises(TypeError, "branches.0.1 (SiLU)"):
        rs.Parallel(nn.Sequential(nn.Conv2d(3, 3, 1), nn.SiLU()), nn.Identity())


# --- channels --------------------------------------------------------------------------------
def test_channel_mismatch_between_convs():
    with _raises(ValueError, "layers.1 (Conv2d)", "channels", "layers.0 (Conv2d)"):
        rs.SqueezableBlock(nn.Conv2d(3, 4, 3), nn.Conv2d(5, 2, 3))


def test_channel_mismatch_of_batchnorm():
    with _raises(ValueError, "layers.2 (BatchNorm2d)", "channels"):
        rs.SqueezableBlock(nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(5))


def test_channel_mismatch_in_nested_sequential():
    with _raises(ValueError, "layers.1.1 (Conv2d)", "channels"):
        rs.SqueezableBlock(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(5, 2, 1)))


def test_channel_mismatch_between_branches():
    with _raises(ValueError, "branches.1 (Conv2d)", "output channels"):
        rs.Parallel(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1))
    with _raises(ValueError, "branches.1 (Conv2d)", "input channels"):
        rs.Parallel(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(2, 4, 1))


def test_identity_branch_needs_equal_channels():
    with _raises(ValueError, "branches.1 (Identity)", "channels"):
        rs.Parallel(nn.Conv2d(3, 4, 3, padding=1), nn.Identity())


# --- parallel geometry -----------------------------------------------------------------------
def test_misaligned_branches():
    with _raises(ValueError, "branches.1 (Conv2d)", "misaligned", "branches.0 (Conv2d)"):
        rs.Parallel(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=0))


def test_misaligned_identity_branch():
    with _raises(ValueError, "branches.1 (BatchNorm2d)", "misaligned"):
        rs.Parallel(nn.Conv2d(3, 3, 5, padding=1), nn.BatchNorm2d(3))


def test_branches_with_different_strides():
    with _raises(ValueError, "branches.1 (Conv2d)", "stride"):
        rs.Parallel(nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.Conv2d(3, 3, 1))
    with _raises(ValueError, "branches.1 (Sequential)", "stride"):
        rs.Parallel(
            nn.Conv2d(3, 3, 3, padding=1),
            nn.Sequential(nn.Conv2d(3, 3, 1, stride=2), nn.BatchNorm2d(3)),
        )


# --- padding modes and pooling ---------------------------------------------------------------
def test_mixed_padding_modes_in_chain():
    with _raises(ValueError, "layers.1 (Conv2d)", "padding_mode", "reflect", "zeros"):
        rs.SqueezableBlock(
            nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 3, 3, padding=1)
        )


def test_padded_avgpool_pads_with_zeros():
    with _raises(ValueError, "layers.1 (AvgPool2d)", "padding_mode"):
        rs.SqueezableBlock(
            nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), nn.AvgPool2d(3, 1, padding=1)
        )


def test_mixed_padding_modes_across_branches():
    with _raises(ValueError, "branches.1 (Conv2d)", "padding_mode"):
        rs.Parallel(
            nn.Conv2d(3, 3, 3, padding=1, padding_mode="replicate"),
            nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        )


def test_padding_mode_of_layers_that_do_not_pad_is_ignored():
    block = rs.SqueezableBlock(
        nn.Conv2d(3, 3, 1, padding_mode="circular"),
        nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 3, 3, padding="valid", padding_mode="replicate"),
    )
    assert block.squeeze().padding_mode == "reflect"


def test_avgpool_count_include_pad_false_with_padding():
    with _raises(ValueError, "layers.1 (AvgPool2d)", "count_include_pad"):
        rs.SqueezableBlock(nn.Conv2d(3, 3, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False))


def test_avgpool_count_include_pad_false_without_padding_is_fine():
    block = rs.SqueezableBlock(nn.Conv2d(3, 3, 1), nn.AvgPool2d(3, 2, count_include_pad=False))
    assert block.squeeze().stride == (2, 2)


def test_avgpool_ceil_mode():
    with _raises(ValueError, "layers.0 (AvgPool1d)", "ceil_mode"):
        rs.SqueezableBlock(nn.AvgPool1d(2, ceil_mode=True), nn.Conv1d(2, 2, 1))


def test_mixed_dimensionality():
    with _raises(ValueError, "layers.1 (Conv2d)", "layers.0 (Conv1d)", "dimensionality"):
        rs.SqueezableBlock(nn.Conv1d(3, 3, 3), nn.Conv2d(3, 3, 3))


def test_empty_blocks():
    with pytest.raises(ValueError, match="at least one"):
        rs.SqueezableBlock()
    with pytest.raises(ValueError, match="at least one"):
        rs.Parallel()


# --- values at squeeze / deploy time ---------------------------------------------------------
def _block() -> rs.SqueezableBlock:
    return rs.SqueezableBlock(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1)
    ).eval()


@pytest.mark.parametrize(
    ("index", "attr", "value"),
    [
        (0, "weight", float("nan")),
        (0, "bias", float("inf")),
        (1, "running_mean", float("nan")),
        (1, "running_var", float("inf")),
        (1, "weight", float("nan")),
        (1, "bias", float("-inf")),
        (2, "weight", float("-inf")),
    ],
)
def test_non_finite_values_are_refused(index, attr, value):
    block = _block()
    with torch.no_grad():
        getattr(block.layers[index], attr).view(-1)[0] = value
    where = f"layers.{index} ({type(block.layers[index]).__name__})"
    with _raises(ValueError, where, attr, "non-finite"):
        block.squeeze()
    with _raises(ValueError, where, "non-finite"):
        block.deploy()
    assert not block.deployed and hasattr(block, "layers")  # a refused deploy changes nothing
    model = nn.Sequential(nn.ReLU(), block)
    with _raises(ValueError, f"{where}", "non-finite"):
        rs.deploy(model)
    assert not block.deployed


def test_non_finite_value_in_nested_block_names_the_full_path():
    inner = rs.Parallel(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1))
    block = rs.SqueezableBlock(nn.Conv2d(2, 2, 1), inner)
    with torch.no_grad():
        inner.branches[0].weight[0, 0, 0, 0] = float("nan")
    assert "layers.1.branches.0.weight" in block.state_dict()
    with _raises(ValueError, "layers.1.branches.0 (Conv2d)", "non-finite"):
        block.squeeze()


def test_negative_running_variance_is_refused():
    block = _block()
    with torch.no_grad():
        block.layers[1].running_var[0] = -1.0
    with _raises(ValueError, "layers.1 (BatchNorm2d)", "running_var"):
        block.squeeze()


def test_batchnorm_without_running_statistics():
    block = rs.SqueezableBlock(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Conv2d(4, 2, 1),
    ).eval()
    block(torch.randn(2, 3, 5, 5))  # it runs (with batch statistics), it just cannot fold
    with _raises(ValueError, "layers.1 (BatchNorm2d)", "running statistics"):
        block.squeeze()
    with _raises(ValueError, "layers.1 (BatchNorm2d)", "running statistics"):
        block.deploy()
    assert not block.deployed


def test_batchnorm_without_running_statistics_in_nested_sequential():
    block = rs.SqueezableBlock(
        nn.Conv2d(2, 2, 1),
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)),
    )
    with _raises(ValueError, "layers.1.1 (BatchNorm2d)", "running statistics"):
        block.squeeze()


def test_block_without_dimensionality_or_channels():
    with pytest.raises(ValueError, match="dimensionality"):
        rs.SqueezableBlock(nn.Identity()).squeeze()
    with pytest.raises(ValueError, match="channels"):
        rs.SqueezableBlock(nn.AvgPool2d(3, 1)).squeeze()


# --- float16: the float64 composite must survive the cast ------------------------------------
def _half_chain(weight: float, bias: float) -> rs.SqueezableBlock:
    """3x3 -> 3x3 in float16; every weight and bias set to the given (representable) values."""
    block = rs.SqueezableBlock(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1))
    with torch.no_grad():
        for conv in block.layers:
            conv.weight.fill_(weight)
            conv.bias.fill_(bias)
    return block.half().eval()


@pytest.mark.parametrize(
    ("weight", "bias", "attr", "largest"),
    [
        (40.0, 0.0, "weight", 40 * 40 * 8 * 9),  # centre tap: 8 channels x 9 overlapping taps
        (0.01, 60000.0, "bias", 60000 + 0.01 * 8 * 9 * 60000),  # b2 + sum(W2) @ b1
    ],
)
def test_float16_composite_that_overflows_is_refused(weight, bias, attr, largest):
    block = _half_chain(weight, bias)
    assert all(torch.isfinite(p).all() for p in block.parameters())
    if attr == "weight":  # the chain itself runs finite; only the one composite kernel overflows
        x = torch.full((1, 4, 5, 5), 1e-3, dtype=torch.float16)
        with torch.no_grad():
            assert torch.isfinite(block(x)).all()
    message = (f"SqueezableBlock: the composite {attr} overflows float16", f"{largest:.4g}")
    with _raises(ValueError, *message, "float32"):
        block.squeeze()
    with _raises(ValueError, *message):
        block.deploy()
    assert not block.deployed and hasattr(block, "layers")  # a refused deploy changes nothing
    model = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Identity(), block))
    with _raises(ValueError, f"1.1: {message[0]}"):  # the walker adds where the block is
        rs.deploy(model)
    # the same block in float32 deploys, exactly
    block = block.float()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        y = block(x)
        err = (block.squeeze()(x) - y).abs().max() / y.abs().max()
    assert err <= 1e-5


def test_float16_composite_that_fits_is_accepted():
    block = _half_chain(20.0, 1.0)  # largest tap 20 * 20 * 8 * 9 = 28800 < 65504
    conv = block.squeeze()
    assert conv.weight.dtype == torch.float16
    assert conv.weight.abs().max().item() == 28800.0


# --- BatchNorm with batch statistics over one value per channel ------------------------------
def _chain_with_bn(dims: int = 2) -> list[nn.Module]:
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
    return [conv(3, 4, 3, padding=1), bn(4), conv(4, 2, 3, padding=1)]


@pytest.mark.parametrize(
    ("shape", "position"),
    [
        ((1, 3, 1, 1), "inside"),  # batch 1, 1x1: nn.BatchNorm2d refuses
        ((1, 3, 1), "inside"),  # the same in 1-D
        ((1, 3, 1, 1), "first"),  # BN first: it still carries the chain's border
        ((1, 3, 1, 1), "branch"),  # BN as a Parallel branch
        ((2, 3, 1, 1), "inside"),  # two values per channel: fine
        ((1, 3, 2, 1), "inside"),  # two positions: fine
    ],
)
def test_batchnorm_one_value_per_channel_raises_like_torch(shape, position):
    layers = _chain_with_bn(len(shape) - 2)
    if position == "first":
        layers = [layers[1].__class__(3), *layers[::2]]
    if position == "branch":
        layers = [layers[0], rs.Parallel(layers[1], nn.Identity()), layers[2]]
    block = rs.SqueezableBlock(*layers).train()
    before, chain = copy.deepcopy(block), copy.deepcopy(block)
    x = torch.randn(shape)
    try:  # nn.BatchNorm's own behaviour on the naive chain
        naive(chain, x)
    except ValueError as err:
        assert "Expected more than 1 value per channel when training" in str(err)
        bn = next(m for m in block.modules() if isinstance(m, _BatchNorm))
        with _raises(ValueError, f"{type(bn).__name__}(", str(err)):
            block(x)
        for name, value in before.state_dict().items():
            assert torch.equal(block.state_dict()[name], value), f"{name} changed by a refusal"
        with torch.no_grad():
            block.eval()(x)  # running statistics: one value is fine
        return
    block(x)  # the same batch statistics as the naive chain's BatchNorm
    for name, value in chain.state_dict().items():
        assert_equivalent(block.state_dict()[name], value, 1e-6)


def test_batchnorm_one_value_per_channel_reads_no_tensor_value(monkeypatch):
    """The check (and the training forward) read shapes only: reading a tensor's value on the
    host, which is a device sync on GPU, raises here."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    block = rs.SqueezableBlock(*_chain_with_bn()).train()
    x = torch.randn(2, 3, 1, 1)
    for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    assert block(x).shape == (2, 2, 1, 1)
    with _raises(ValueError, "BatchNorm2d(4)", "Expected more than 1 value per channel"):
        block(x[:1])


@pytest.mark.gpu
def test_batchnorm_in_a_chain_trains_on_cuda_without_host_sync():
    block = rs.SqueezableBlock(*_chain_with_bn()).train().cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    block(x).sum().backward()  # warm-up: cuDNN plans, allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
    try:
        block(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with _raises(ValueError, "Expected more than 1 value per channel"):
        block(x[:1, :, :1, :1])


# --- the meta device: the deployed architecture without values --------------------------------
def _signature(conv: nn.Module) -> tuple:
    return (
        type(conv), tuple(conv.weight.shape), conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.padding_mode, conv.bias is not None,
    )  # fmt: skip


def _meta_cases() -> dict[str, Callable[[], nn.Module]]:
    return {
        "dbb": lambda: rs.make_block("dbb", 4, 6, 3, stride=2, groups=2),
        "expand_cl": lambda: rs.make_block("expand_cl", 3, 5, 5, padding_mode="reflect"),
        "tree": lambda: rs.SqueezableBlock(
            nn.Conv1d(2, 4, 3, padding="same", dilation=2),
            nn.BatchNorm1d(4),
            rs.Parallel(nn.Conv1d(4, 4, 3, padding=1, groups=2), nn.Identity()),
        ),
    }


@pytest.mark.parametrize("case", list(_meta_cases()))
def test_squeeze_and_deploy_on_meta_build_the_architecture(case):
    make = _meta_cases()[case]
    torch.manual_seed(0)
    expected = make().eval().squeeze()
    with torch.device("meta"):
        block = make().eval()
    assert all(p.is_meta for p in block.parameters())
    conv = block.squeeze()
    assert conv.weight.is_meta and conv.bias.is_meta
    assert _signature(conv) == _signature(expected)
    assert block.deploy() is block and block.deployed
    assert block.conv.weight.is_meta and _signature(block.conv) == _signature(expected)
    assert _signature(block.squeeze()) == _signature(expected)  # a deployed block on meta too


def test_model_deploy_on_meta_then_materialize_loads_strict():
    """Build on meta, deploy there (no memory for branches), then fill with real weights."""
    torch.manual_seed(0)
    real = rs.deploy(rs.create_model("digits_net", block="dbb").eval())
    with torch.device("meta"):
        model = rs.create_model("digits_net", block="dbb").eval()
    deployed = rs.deploy(model)
    assert all(t.is_meta for t in deployed.state_dict().values())
    assert {k: v.shape for k, v in deployed.state_dict().items()} == {
        k: v.shape for k, v in real.state_dict().items()
    }
    deployed = deployed.to_empty(device="cpu")
    deployed.load_state_dict(real.state_dict(), strict=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert_equivalent(deployed(x), real(x), 1e-6)
