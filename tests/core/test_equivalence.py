"""Property-based equivalence: a block in training form == its squeezed convolution, and
== the naive chain away from the border.

Hypothesis draws blocks over the whole accepted space (``strategies.examples``): chains and
branch trees in 1-D, 2-D and 3-D, every padding mode, BatchNorm statistics randomized, odd
input sizes. The checks are tolerances on the max error (1e-10 in float64, 1e-5 in float32,
relative to the output scale), against the squeezed convolution and, on the interior (no
layer reads its padding there), against the naive chain of plain PyTorch modules.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import (
    BN_CLASS,
    CONV_CLASS,
    CONVS,
    assert_equivalent,
    assert_interior_matches_naive,
    expected_stride,
    interior,
    interior_sizes,
    naive,
    randomize,
)
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from strategies import MODES, Example, divisors, examples, fit_sizes
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
]


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- properties ------------------------------------------------------------------------------
@settings(max_examples=4 * settings.default.max_examples)  # the central test: 4x the profile
@given(examples())
def test_squeeze_equals_block_float64(ex: Example):
    block, x = ex.block, ex.input()
    before = _state(block)
    with torch.no_grad():
        y = block(x)
        assert y.shape == naive(block, x).shape  # border-consistent padding keeps the shape
        conv = block.squeeze()
        note(f"squeezed: {conv}")
        assert type(conv) is CONV_CLASS[ex.ndim]
        assert conv.weight.dtype == torch.float64 and conv.bias.dtype == torch.float64
        assert tuple(conv.stride) == expected_stride(block, ex.ndim)
        assert_equivalent(conv(x), y, 1e-10)
        if not y[interior(block, ex.sizes)].numel():  # grow the input until it has one
            x = ex.input(sizes=interior_sizes(block, ex.sizes))
            y = block(x)
        assert_interior_matches_naive(block, x, y, 1e-10)  # the independent oracle
    assert not block.deployed  # squeeze leaves the block alone
    _assert_same_state(before, _state(block))


@given(examples())
def test_squeeze_float32_matches_float64_reference(ex: Example):
    x = ex.input()
    with torch.no_grad():
        ref = ex.block(x)
        conv = copy.deepcopy(ex.block).float().squeeze()
        assert conv.weight.dtype == torch.float32
        assert_equivalent(conv(x.float()), ref, 1e-5)


@given(examples())
def test_deploy_is_exact_and_idempotent(ex: Example):
    block, x = ex.block, ex.input()
    with torch.no_grad():
        ref = block(x)
        b = copy.deepcopy(block).deploy()
        assert b.deployed
        assert type(b.conv) is CONV_CLASS[ex.ndim]
        keys = list(b.state_dict())
        assert keys == ["conv.weight", "conv.bias"]
        assert not b.training  # deploy keeps eval mode
        assert b.deploy() is b
        assert list(b.state_dict()) == keys
        assert_equivalent(b(x), ref, 1e-10)
        assert_equivalent(b.squeeze()(x), ref, 1e-10)  # a deployed block still squeezes


@given(examples())
def test_model_deploy_copies_unless_inplace(ex: Example):
    block, x = ex.block, ex.input()
    before = _state(block)
    with torch.no_grad():
        ref = block(x)
        out = rs.deploy(block)
        assert out is not block and out.deployed and not block.deployed
        _assert_same_state(before, _state(block))
        assert torch.equal(block(x), ref)
        assert_equivalent(out(x), ref, 1e-10)
        again = rs.deploy(out)
        assert list(again.state_dict()) == list(out.state_dict())
        assert_equivalent(again(x), ref, 1e-10)
        assert rs.deploy(block, inplace=True) is block
        assert block.deployed
        assert_equivalent(block(x), ref, 1e-10)


def _stands_alone(m: nn.Module) -> bool:
    """A nested block with a layer fixing its dimensionality and its channel count."""
    fixes_channels = any(isinstance(c, (*CONVS, _BatchNorm)) for c in m.modules())
    return isinstance(m, rs.Squeezable) and m.ndim is not None and fixes_channels


@given(examples(), st.data())
def test_nested_deployed_blocks_inside_training_form(ex: Example, data):
    """Deploying some inner blocks first changes neither the outputs nor the squeeze."""
    block, x = ex.block, ex.input()
    inner = [m for m in block.modules() if m is not block and _stands_alone(m)]
    assume(inner)
    with torch.no_grad():
        ref = block(x)
        for m in inner:
            if data.draw(st.booleans(), label=f"deploy {type(m).__name__}"):
                m.deploy()
        assert_equivalent(block(x), ref, 1e-10)
        assert_equivalent(block.squeeze()(x), ref, 1e-10)


# --- structure of the squeezed convolution ---------------------------------------------------
@st.composite
def grouped_chains(draw, depthwise: bool):
    ndim = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.integers(2, 3 if ndim == 3 else 6))
    mult = [1] if depthwise else [1, 2]
    layers, c = [], groups * draw(st.sampled_from(mult))
    c_in = c
    for _ in range(draw(st.integers(1, 2 if ndim == 3 else 3))):
        c_out = c if depthwise else groups * draw(st.sampled_from(mult))
        k = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
        s = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
        d = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
        p = draw(st.integers(0, 2))
        layers.append(CONV_CLASS[ndim](c, c_out, k, s, p, d, groups=groups))
        if draw(st.booleans()):
            layers.append(BN_CLASS[ndim](c_out))
        c = c_out
    block = rs.SqueezableBlock(*layers)
    seed = draw(st.integers(0, 2**31 - 1))
    randomize(block.double(), torch.Generator().manual_seed(seed)).eval()
    sizes = fit_sizes(block, ndim, c_in, (9 if ndim < 3 else 5,) * ndim)
    return Example(block, ndim, c_in, sizes, seed), groups


@given(grouped_chains(depthwise=True))
def test_depthwise_chain_stays_depthwise(case):
    ex, channels = case
    conv = ex.block.squeeze()
    assert conv.groups == conv.in_channels == conv.out_channels == channels
    with torch.no_grad():
        assert_equivalent(conv(ex.input()), ex.block(ex.input()), 1e-10)


@given(grouped_chains(depthwise=False))
def test_grouped_chain_keeps_groups(case):
    ex, groups = case
    conv = ex.block.squeeze()
    assert conv.groups == groups
    with torch.no_grad():
        assert_equivalent(conv(ex.input()), ex.block(ex.input()), 1e-10)


@given(
    st.sampled_from([1, 2, 3]),
    st.integers(2, 3),
    st.lists(
        st.tuples(st.integers(1, 4), st.integers(0, 3), st.booleans()), min_size=2, max_size=3
    ),
)
def test_dilated_chain_keeps_dilation(ndim, dilation, convs):
    """Stride-1 convs sharing dilation d compose to kernel sum(k_i - 1) + 1 with dilation d."""
    assume(any(k > 1 for k, _, _ in convs))
    layers = []
    for k, p, bn in convs:
        layers.append(CONV_CLASS[ndim](2, 2, k, padding=p, dilation=dilation))
        if bn:
            layers.append(BN_CLASS[ndim](2))
    block = randomize(rs.SqueezableBlock(*layers).double(), torch.Generator().manual_seed(0))
    block.eval()
    conv = block.squeeze()
    assert conv.dilation == (dilation,) * ndim
    assert conv.kernel_size == (sum(k - 1 for k, _, _ in convs) + 1,) * ndim
    size = max(5, dilation * sum(k - 1 for k, _, _ in convs) + 1) | 1  # odd, fits unpadded
    x = torch.randn(2, 2, *(size,) * ndim, dtype=torch.float64)
    with torch.no_grad():
        assert_equivalent(conv(x), block(x), 1e-10)


def test_two_dilated_3x3_give_5x5_dilation_2():
    block = rs.SqueezableBlock(
        nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 2, 3, padding=2, dilation=2)
    )
    conv = block.squeeze()
    assert conv.kernel_size == (5, 5) and conv.dilation == (2, 2) and conv.padding == (4, 4)


# --- RepVGG ----------------------------------------------------------------------------------
@st.composite
def repvgg_blocks(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    tiny = dims == 3
    c_in = draw(st.integers(1, 3 if tiny else 6))
    c_out = draw(st.sampled_from([c_in, *range(1, 4 if tiny else 7)]))
    stride = draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3 if tiny else 5))
    dilation = draw(st.integers(1, 2))
    if stride > 1 and dilation * (kernel - 1) % 2:
        kernel += 1  # an even window has no centre unless padding='same' (stride 1 only)
    groups = draw(st.sampled_from(divisors(math.gcd(c_in, c_out))))
    mode = draw(st.sampled_from(MODES))
    block = rs.RepVGGBlock(
        c_in, c_out, kernel, stride, dilation=dilation, groups=groups, padding_mode=mode, dims=dims
    )
    seed = draw(st.integers(0, 2**31 - 1))
    randomize(block.double(), torch.Generator().manual_seed(seed)).eval()
    sizes = (
        (7,) * dims if tiny else tuple(draw(st.sampled_from([7, 9, 11, 13])) for _ in range(dims))
    )
    return Example(block, dims, c_in, sizes, seed), (kernel, dilation, stride, groups)


@given(repvgg_blocks())
def test_repvgg_squeezes_to_its_main_kernel(case):
    ex, (kernel, dilation, stride, groups) = case
    x = ex.input()
    with torch.no_grad():
        ref = ex.block(x)
        assert ref.shape == naive(ex.block, x).shape
        conv = ex.block.squeeze()
        assert_equivalent(conv(x), ref, 1e-10)
        assert_equivalent(copy.deepcopy(ex.block).float().squeeze()(x.float()), ref, 1e-5)
    assert type(conv) is CONV_CLASS[ex.ndim]
    assert conv.stride == (stride,) * ex.ndim
    assert conv.groups == groups
    if kernel % 2:  # odd kernels are centred: the 1x1 and identity taps land on the grid
        assert conv.kernel_size == (kernel,) * ex.ndim
        assert conv.dilation == ((dilation if kernel > 1 else 1),) * ex.ndim


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_squeeze_keeps_padding_mode(dims):
    for mode in MODES:
        block = rs.RepVGGBlock(2, 2, padding_mode=mode, dims=dims)
        assert block.squeeze().padding_mode == mode
