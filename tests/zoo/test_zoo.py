"""Tests for repsqueeze.zoo: every block kind equals its squeezed conv, and all kinds deploy
to the same architecture (``make_block``'s contract).

BatchNorm statistics and affine parameters are randomized first, so folding BN is tested,
and everything runs in float64 in eval mode.
"""

from functools import partial

import pytest
import torch
from helpers import assert_equivalent, assert_gradients_match_finite_differences, randomize_bn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs
from repsqueeze.core.algebra import CONV_CLASSES
from repsqueeze.zoo import BLOCKS, make_block

KINDS = list(BLOCKS)
RTOL = 1e-10  # float64: max|squeezed - block| <= RTOL * max(1, max|block|)
# (in_channels, out_channels, groups): plain, identity-capable, grouped, depthwise.
CHANNELS = [(4, 6, 1), (4, 4, 1), (4, 6, 2), (4, 4, 2), (4, 4, 4)]
SIZES = {1: (11,), 2: (9, 8), 3: (6, 5, 7)}


pytestmark = pytest.mark.usefixtures("single_thread")
# single_thread is function-scoped; resetting it between hypothesis examples is harmless.
SUPPRESSED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def prepared(block: nn.Module, generator: torch.Generator) -> nn.Module:
    """The block in float64, eval mode, with randomized BatchNorm."""
    return randomize_bn(block.double().eval(), generator)


def assert_contract(conv: nn.Module, c_in, c_out, k, stride, groups, dims) -> None:
    """``ConvNd(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=True)``."""
    assert type(conv) is CONV_CLASSES[dims]
    assert (conv.in_channels, conv.out_channels, conv.groups) == (c_in, c_out, groups)
    assert conv.kernel_size == (k,) * dims
    assert conv.stride == (stride,) * dims
    assert conv.padding == (k // 2,) * dims
    assert conv.dilation == (1,) * dims
    assert conv.bias is not None
    assert conv.padding_mode == "zeros"


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("c_in", "c_out", "groups"), CHANNELS)
@pytest.mark.parametrize("kind", KINDS)
def test_block_squeezes_exactly_to_the_contract_conv(
    kind, c_in, c_out, groups, stride, dims, generator
):
    block = prepared(make_block(kind, c_in, c_out, 3, stride, groups, dims), generator)
    x = torch.randn(2, c_in, *SIZES[dims], dtype=torch.float64, generator=generator)
    conv = block.squeeze()
    assert_contract(conv, c_in, c_out, 3, stride, groups, dims)
    assert_equivalent(conv(x), block(x), RTOL)

    built = make_block(kind, c_in, c_out, 3, stride, groups, dims, deployed=True)
    assert_contract(built.conv, c_in, c_out, 3, stride, groups, dims)
    assert n_params(built) == n_params(built.conv) == n_params(conv)
    assert not any(t.is_meta for t in [*built.parameters(), *built.buffers()])
    deployed = rs.deploy(block)
    built.double().load_state_dict(deployed.state_dict(), strict=True)
    assert_equivalent(built(x), block(x), RTOL)


@settings(suppress_health_check=SUPPRESSED)
@given(
    kind=st.sampled_from(KINDS),
    kernel_size=st.sampled_from([1, 3, 5]),
    stride=st.integers(1, 3),
    dims=st.integers(1, 2),
    groups=st.sampled_from([1, 2, 3]),
    c_in_g=st.integers(1, 3),
    c_out_g=st.integers(1, 3),
    size=st.integers(5, 12),
)
def test_contract_holds_over_configurations(
    kind, kernel_size, stride, dims, groups, c_in_g, c_out_g, size
):
    c_in, c_out = groups * c_in_g, groups * c_out_g
    generator = torch.Generator().manual_seed(0)
    block = prepared(make_block(kind, c_in, c_out, kernel_size, stride, groups, dims), generator)
    x = torch.randn(2, c_in, *(size,) * dims, dtype=torch.float64, generator=generator)
    conv = block.squeeze()
    assert_contract(conv, c_in, c_out, kernel_size, stride, groups, dims)
    assert_equivalent(conv(x), block(x), RTOL)


@settings(suppress_health_check=SUPPRESSED)
@given(
    kind=st.sampled_from(["plain", "repvgg", "acb", "mobileone"]),
    kernel_size=st.sampled_from([3, 5]),
    dilation=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
)
def test_dilation_and_padding_modes_are_kept(kind, kernel_size, dilation, stride, padding_mode):
    generator = torch.Generator().manual_seed(0)
    block = make_block(
        kind, 3, 4, kernel_size, stride, dilation=dilation, padding_mode=padding_mode
    )
    block = prepared(block, generator)
    x = torch.randn(2, 3, 13, 14, dtype=torch.float64, generator=generator)
    conv = block.squeeze()
    assert conv.kernel_size == (kernel_size,) * 2
    assert conv.dilation == (dilation,) * 2
    assert conv.padding == (dilation * (kernel_size // 2),) * 2
    assert conv.padding_mode == padding_mode
    assert_equivalent(conv(x), block(x), RTOL)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
@pytest.mark.parametrize("expand_mode", ["ck", "cl"])
def test_expanded_conv_padding_modes(expand_mode, padding_mode, generator):
    block = rs.ExpandedConv(3, 4, 5, expand_mode=expand_mode, padding_mode=padding_mode)
    block = prepared(block, generator)
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, generator=generator)
    conv = block.squeeze()
    assert conv.padding_mode == padding_mode
    assert_equivalent(conv(x), block(x), RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_block_trains(kind, generator):
    """Training-mode gradients (BatchNorm with batch statistics) equal finite differences."""
    block = randomize_bn(make_block(kind, 4, 4, 3, 1, 2).double(), generator).train()
    x = torch.randn(3, 4, 7, 7, generator=generator, dtype=torch.float64)
    assert block(x).shape == (3, 4, 7, 7)
    assert_gradients_match_finite_differences(block, x)


# --- the structure of each block -------------------------------------------------------------


def kernels(block: nn.Module) -> list[tuple[int, ...]]:
    return [
        tuple(m.kernel_size)
        for m in block.modules()
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    ]


def test_conv_bn_is_conv_then_bn():
    block = rs.ConvBN(3, 5, 3, dims=3)
    assert [type(m) for m in block.layers] == [nn.Conv3d, nn.BatchNorm3d]
    assert block.layers[0].bias is None


@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        (1, [(3,), (3,)]),
        (2, [(3, 3), (3, 1), (1, 3)]),
        (3, [(3, 3, 3), (3, 1, 1), (1, 3, 1), (1, 1, 3)]),
    ],
)
def test_acblock_has_one_asymmetric_branch_per_axis(dims, expected):
    assert kernels(rs.ACBlock(2, 2, 3, dims=dims)) == expected


def test_dbb_branches():
    block = rs.DiverseBranchBlock(4, 6)
    assert len(block.branches) == 4
    assert kernels(block) == [(3, 3), (1, 1), (1, 1), (3, 3), (1, 1)]
    assert isinstance(block.branches[3][2], nn.AvgPool2d)
    assert block.branches[2][0].out_channels == 4  # internal_channels defaults to in_channels
    assert rs.DiverseBranchBlock(4, 6, internal_channels=8).branches[2][0].out_channels == 8


def test_dbb_depthwise_drops_the_1x1_branches():
    block = rs.DiverseBranchBlock(4, 4, groups=4)
    assert len(block.branches) == 3
    assert kernels(block) == [(3, 3), (1, 1), (3, 3)]  # k x k, then the 1x1 -> k x k chain
    assert block.branches[1][0].out_channels == 8  # 2 * in_channels, as in DBB
    assert [type(m) for m in block.branches[2]] == [nn.AvgPool2d, nn.BatchNorm2d]


def test_dbb_refuses_what_it_cannot_align():
    with pytest.raises(ValueError, match="odd kernel_size"):
        rs.DiverseBranchBlock(4, 4, 4)
    with pytest.raises(ValueError, match="zeros only"):
        rs.DiverseBranchBlock(4, 4, padding_mode="reflect")


@pytest.mark.parametrize(
    ("c_in", "c_out", "stride", "identity"), [(4, 4, 1, True), (4, 6, 1, False), (4, 4, 2, False)]
)
def test_mobileone_branches(c_in, c_out, stride, identity):
    block = rs.MobileOneBlock(c_in, c_out, stride=stride, num_conv_branches=3)
    assert kernels(block) == [(3, 3)] * 3 + [(1, 1)]
    assert len(block.branches) == 4 + identity
    assert (
        len(rs.MobileOneBlock(c_in, c_out, stride=stride, use_scale=False).branches) == 1 + identity
    )
    with pytest.raises(ValueError, match="num_conv_branches"):
        rs.MobileOneBlock(c_in, c_out, num_conv_branches=0)


def test_repvgg_block_state_dict_is_unchanged():
    keys = list(rs.RepVGGBlock(4, 4).state_dict())
    assert keys[:2] == ["branches.0.0.weight", "branches.0.1.weight"]
    assert keys[-5:] == [
        f"branches.2.{k}"
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]
    assert len(rs.RepVGGBlock(4, 4, use_1x1=False, use_identity=False).branches) == 1


@pytest.mark.parametrize(
    ("kernel_size", "expected"),
    [(1, [(1, 1), (1, 1)]), (3, [(3, 3), (1, 1)]), (5, [(3, 3), (3, 3)]), (7, [(3, 3)] * 3)],
)
def test_expanded_conv_ck_chain(kernel_size, expected):
    block = rs.ExpandedConv(3, 5, kernel_size, stride=2, expand_mode="ck", expansion=2)
    convs = [m for m in block.layers if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == expected
    assert [c.out_channels for c in convs] == [10] * (len(convs) - 1) + [5]
    assert sum(c.stride[0] > 1 for c in convs) == 1
    assert isinstance(block.layers[-1], nn.BatchNorm2d)
    assert not any(isinstance(m, _BatchNorm) for m in block.layers[:-1])


def test_expanded_conv_cl_chain_keeps_groups():
    block = rs.ExpandedConv(4, 6, 3, groups=2, expand_mode="cl", expansion=3)
    convs = list(block.layers)[:-1]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(4, 12), (12, 18), (18, 6)]
    assert all(c.groups == 2 for c in convs)
    assert block.squeeze().groups == 2


def test_expanded_conv_refuses_bad_arguments():
    with pytest.raises(ValueError, match="odd kernel_size"):
        rs.ExpandedConv(3, 3, 4, expand_mode="ck")
    with pytest.raises(ValueError, match="'ck' or 'cl'"):
        rs.ExpandedConv(3, 3, expand_mode="fc")


def test_make_block_refuses_unknown_kinds():
    with pytest.raises(
        ValueError, match="plain, repvgg, acb, dbb, mobileone, expand_ck, expand_cl"
    ):
        make_block("resnet", 3, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_norm_layer_is_used_everywhere(kind, generator):
    norm = partial(nn.BatchNorm2d, eps=1e-2, momentum=0.3)
    block = prepared(make_block(kind, 4, 4, norm_layer=norm), generator)
    bns = [m for m in block.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(bn.eps == 1e-2 and bn.momentum == 0.3 for bn in bns)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, generator=generator)
    assert_equivalent(block.squeeze()(x), block(x), RTOL)


def test_deployed_block_allocates_only_the_conv():
    block = make_block("expand_cl", 64, 64, deployed=True)
    assert n_params(block) == 64 * 64 * 9 + 64
    assert n_params(make_block("expand_cl", 64, 64)) > 16 * n_params(block)
