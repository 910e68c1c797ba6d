"""Depth concatenation (``rs.Concat``, DBB's transform IV): branches concatenated along channels.

The Inception-style block is held to an independent oracle (``torch.cat`` of the branches
run as plain PyTorch layers, each with its own padding) and to its squeezed 5x5 convolution;
hypothesis draws ``Concat`` nodes nested in chains and parallels and containing them, reusing
the strategies of ``test_equivalence``; then groups, online mode, the deployed form, training-
mode BatchNorm and every refusal.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from helpers import (
    BN_CLASS,
    CONV_CLASS,
    POOL_CLASS,
    assert_equivalent,
    assert_interior_matches_naive,
    assert_matches_chain,
    expected_stride,
    interior_sizes,
    naive,
    randomize,
)
from hypothesis import given, note, settings
from strategies import Example, concat_examples
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs
from repsqueeze.core.auto import choose_by_macs, pick_mode

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
]

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 1, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _raises(exc: type[Exception], *fragments: str):
    """``pytest.raises`` that checks each fragment appears literally in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# --- the Inception-style block -----------------------------------------------------------------
def inception_branches(c_in: int, dims: int = 2, first_pads: bool = False) -> list[nn.Module]:
    """1x1 | 1x1-BN-3x3 | 1x1-BN-5x5 | avgpool3-1x1, all aligned on a 5x5 window.

    With ``first_pads`` only the first layer of each branch pads (3x3-BN-1x1, 5x5-BN-1x1):
    then the block equals the plain layers everywhere, not only in the interior.
    """
    conv, bn, pool = CONV_CLASS[dims], BN_CLASS[dims], POOL_CLASS[dims]
    if first_pads:
        mid = [conv(c_in, 3, 3, padding=1), bn(3), conv(3, 5, 1)]
        wide = [conv(c_in, 2, 5, padding=2), bn(2), conv(2, 6, 1)]
    else:
        mid = [conv(c_in, 3, 1), bn(3), conv(3, 5, 3, padding=1)]
        wide = [conv(c_in, 2, 1), bn(2), conv(2, 6, 5, padding=2)]
    return [
        conv(c_in, 4, 1),
        nn.Sequential(*mid),
        nn.Sequential(*wide),
        nn.Sequential(pool(3, 1, 1), conv(c_in, 3, 1)),
    ]


C_OUT = 4 + 5 + 6 + 3


def _inception(c_in: int, dims: int, seed: int, first_pads: bool = False):
    """``(block, plain)``: the Concat and an independent copy of its plain layers."""
    plain = nn.ModuleList(inception_branches(c_in, dims, first_pads))
    randomize(plain.double(), _gen(seed)).eval()
    return rs.Concat(*copy.deepcopy(list(plain))).eval(), plain


def _cat(plain: nn.ModuleList, x: Tensor) -> Tensor:
    """The oracle: every branch run by PyTorch with its own padding, then concatenated."""
    return torch.cat([branch(x) for branch in plain], dim=1)


def _interior(y: Tensor, border: int) -> Tensor:
    return y[(slice(None), slice(None), *(slice(border, -border),) * (y.dim() - 2))]


@pytest.mark.parametrize(("dims", "size"), [(1, 11), (2, 9), (3, 7)])
def test_inception_block_deploys_to_one_5x5_conv(dims, size):
    block, plain = _inception(6, dims, seed=dims)
    x = _randn(2, 6, *(size,) * dims)
    with torch.no_grad():
        y = block(x)
        assert y.shape == (2, C_OUT, *(size,) * dims)
        conv = block.squeeze()
        assert type(conv) is CONV_CLASS[dims]
        assert conv.in_channels == 6 and conv.out_channels == C_OUT
        assert conv.kernel_size == (5,) * dims and conv.padding == (2,) * dims
        assert conv.groups == 1 and conv.stride == (1,) * dims
        assert_equivalent(conv(x), y, 1e-10)
        assert_equivalent(copy.deepcopy(block).float().squeeze()(x.float()), y, 1e-5)
        # the independent oracle: equal away from the 2-sample border
        ref = _cat(plain, x)
        assert_equivalent(_interior(y, 2), _interior(ref, 2), 1e-10)
        assert_equivalent(naive(block, x), ref, 1e-12)


def test_inception_block_equals_plain_layers_everywhere_when_only_first_layers_pad():
    block, plain = _inception(5, 2, seed=4, first_pads=True)
    x = _randn(3, 5, 9, 8)
    with torch.no_grad():
        ref = _cat(plain, x)
        assert_equivalent(block(x), ref, 1e-10)
        assert_equivalent(block.squeeze()(x), ref, 1e-10)
        block32 = copy.deepcopy(block).float()
        assert_equivalent(rs.deploy(block32)(x.float()), ref, 1e-5)


def test_inception_block_deployed_state_dict_loads_strict_into_a_deployed_build():
    block, _ = _inception(6, 2, seed=5)
    x = _randn(2, 6, 9, 9)
    with torch.no_grad():
        ref = block(x)
        deployed = rs.deploy(block)
        assert list(deployed.state_dict()) == ["conv.weight", "conv.bias"]
        built = rs.Concat(*inception_branches(6), deployed=True).double()
        assert not hasattr(built, "branches") and built.deployed
        built.load_state_dict(deployed.state_dict(), strict=True)
        assert_equivalent(built(x), ref, 1e-10)
        assert_equivalent(deployed(x), ref, 1e-10)
        assert deployed.deploy() is deployed  # idempotent


def test_inception_block_inside_a_model_deploys_with_the_model():
    block, _ = _inception(6, 2, seed=6)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), block, nn.ReLU()).double().eval()
    x = _randn(2, 3, 11, 11)
    with torch.no_grad():
        assert_equivalent(rs.deploy(model)(x), model(x), 1e-10)


def test_inception_block_online_equals_chain_outputs_and_gradients():
    """BatchNorm in eval mode folds live: online composes the 5x5 kernel in the forward."""
    block, _ = _inception(6, 2, seed=7)
    assert_matches_chain(block, _randn(3, 6, 9, 9), 1e-10)
    assert_matches_chain(block.float(), _randn(3, 6, 9, 9, dtype=torch.float32), 1e-5)


def test_bn_free_concat_online_equals_chain_in_training():
    block = rs.Concat(
        nn.Conv1d(3, 2, 3, padding=1, padding_mode="circular"),
        nn.Sequential(nn.Conv1d(3, 4, 1), nn.Conv1d(4, 2, 3, padding=1, padding_mode="circular")),
        rs.Parallel(nn.Identity(), nn.Conv1d(3, 3, 3, padding=1, padding_mode="circular")),
    )
    block = randomize(block.double(), _gen(8)).train()
    assert_matches_chain(block, _randn(2, 3, 11), 1e-10)
    assert_matches_chain(block, _randn(2, 3, 11), 1e-10, mode="auto")


def test_online_refuses_a_training_mode_bn_in_a_branch_and_auto_falls_back_to_chain():
    block, _ = _inception(4, 2, seed=12)
    x = _randn(2, 4, 7, 7)
    with _raises(ValueError, "branches.1.1 (BatchNorm2d)", "online_norm"):
        copy.deepcopy(block).train().set_mode("online")(x)
    auto = copy.deepcopy(block).train().set_mode("auto")
    assert pick_mode(auto, x, 2) == "chain"
    assert_equivalent(auto(x), copy.deepcopy(block).train()(x), 1e-12)


def test_training_mode_bn_uses_each_branch_interior_as_the_plain_layers():
    """Batch statistics of a BN inside a branch equal those of the plain layers: the branch
    gets exactly the window it would have padded itself (first_pads: the 3x3 branch's BN
    sees a 9x9 output, not one grown by the 5x5 branch's larger border)."""
    for first_pads in (False, True):
        block, plain = _inception(4, 2, seed=9, first_pads=first_pads)
        block.train()
        plain.train()
        x = _randn(4, 4, 9, 9)
        for _ in range(2):
            y, ref = block(x), _cat(plain, x)
        assert_equivalent(_interior(y, 2), _interior(ref, 2), 1e-10)
        if first_pads:
            assert_equivalent(y, ref, 1e-10)
        ours_bns, theirs_bns = (
            [m for m in b.modules() if isinstance(m, _BatchNorm)] for b in (block, plain)
        )
        assert len(ours_bns) == 2
        for ours, theirs in zip(ours_bns, theirs_bns, strict=True):
            assert ours.num_batches_tracked.item() == 2
            assert_equivalent(ours.running_mean, theirs.running_mean, 1e-12)
            assert_equivalent(ours.running_var, theirs.running_var, 1e-12)


# --- groups: what the structure allows ----------------------------------------------------------
def test_concat_of_one_grouped_branch_keeps_its_groups():
    block = randomize(rs.Concat(nn.Conv2d(6, 9, 3, padding=1, groups=3)).double(), _gen(10))
    conv = block.squeeze()
    assert conv.groups == 3
    x = _randn(2, 6, 7, 7)
    with torch.no_grad():
        assert_equivalent(conv(x), block(x), 1e-10)


@pytest.mark.parametrize(
    "branches",
    [
        [nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 2, 1, groups=2)],
        [nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.Identity()],
        [nn.AvgPool2d(3, 1, 1), nn.Conv2d(4, 8, 1, groups=4)],
    ],
    ids=["grouped", "depthwise-like", "pool-and-depthwise"],
)
def test_concat_of_grouped_branches_is_one_dense_conv_with_structural_zeros(branches):
    """Every accepted layer reads all of its input channels, so each branch does, and a
    concatenation of two or more branches is never block-diagonal in PyTorch's group layout
    (branch 1's rows already span every group): groups=1, with the grouped branches' zeros
    in place. Branches reading slices of the input need ``split`` (tested below)."""
    block = randomize(rs.Concat(*branches).double(), _gen(11)).eval()
    conv = block.squeeze()
    assert conv.groups == 1
    masks = []  # which input channels each output channel reads, from the layers' attributes
    for b in branches:
        if isinstance(b, nn.Conv2d):
            o = torch.arange(b.out_channels) // (b.out_channels // b.groups)
            i = torch.arange(4) // (4 // b.groups)
            masks.append(o[:, None] == i[None, :])
        else:
            masks.append(torch.eye(4, dtype=torch.bool))
    assert torch.equal(conv.weight.abs().sum((2, 3)).ne(0), torch.cat(masks))
    x = _randn(2, 4, 7, 7)
    with torch.no_grad():
        assert_equivalent(conv(x), block(x), 1e-10)


# --- split input: each branch reads a slice of the channels ------------------------------------
def _split_oracle(block: rs.Concat, plain: nn.ModuleList, x: Tensor) -> Tensor:
    xs = torch.split(x, block.split, dim=1)
    return torch.cat([b(xb) for b, xb in zip(plain, xs, strict=True)], dim=1)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_concat_of_per_group_convs_of_a_split_input_is_one_grouped_conv(dims):
    """ResNeXt-style: four branches, each a 3x3-BN-1x1 chain on its quarter of the input."""
    conv, bn = CONV_CLASS[dims], BN_CLASS[dims]
    plain = nn.ModuleList(
        nn.Sequential(conv(2, 3, 3, padding=1), bn(3), conv(3, 2, 1)) for _ in range(4)
    )
    randomize(plain.double(), _gen(14)).eval()
    block = rs.Concat(*copy.deepcopy(list(plain)), split=(2, 2, 2, 2)).eval()
    squeezed = block.squeeze()
    assert squeezed.groups == 4
    assert (squeezed.in_channels, squeezed.out_channels) == (8, 8)
    assert squeezed.kernel_size == (3,) * dims
    x = _randn(2, 8, *(7,) * dims)
    with torch.no_grad():
        ref = _split_oracle(block, plain, x)
        assert_equivalent(block(x), ref, 1e-10)  # only the first layer pads: equal everywhere
        assert_equivalent(squeezed(x), ref, 1e-10)
        assert_equivalent(copy.deepcopy(block).float().squeeze()(x.float()), ref, 1e-5)
    assert_matches_chain(block, x, 1e-10)


def test_shufflenet_style_identity_half_squeezes_to_two_groups():
    """Half the channels pass through, the other half go 1x1-BN-dw3x3-BN-1x1 (ShuffleNetV2's
    unit, without its ReLUs): one conv with groups=2 and the identity as its first block."""
    plain = nn.ModuleList(
        [
            nn.Identity(),
            nn.Sequential(
                nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
            ),
        ]
    )  # fmt: skip
    randomize(plain.double(), _gen(15)).eval()
    block = rs.Concat(*copy.deepcopy(list(plain)), split=(4, 4)).eval()
    squeezed = block.squeeze()
    assert squeezed.groups == 2 and squeezed.kernel_size == (3, 3)
    centre = squeezed.weight[:4, :, 1, 1]
    assert torch.equal(centre, torch.eye(4, dtype=F64))
    assert squeezed.weight[:4].abs().sum() == 4
    x = _randn(2, 8, 9, 9)
    with torch.no_grad():
        ref = _split_oracle(block, plain, x)
        assert_equivalent(_interior(block(x), 1), _interior(ref, 1), 1e-10)
        assert_equivalent(squeezed(x), block(x), 1e-10)


def test_unequal_split_is_block_diagonal_but_one_group():
    block = rs.Concat(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(3, 2, 1), split=(1, 3))
    block = randomize(block.double(), _gen(16))
    squeezed = block.squeeze()
    assert squeezed.groups == 1 and squeezed.in_channels == 4
    mask = squeezed.weight.abs().sum((2, 3)).ne(0)
    assert torch.equal(mask, torch.tensor([[1, 0, 0, 0]] * 2 + [[0, 1, 1, 1]] * 2).bool())
    x = _randn(2, 4, 7, 7)
    with torch.no_grad():
        assert_equivalent(squeezed(x), block(x), 1e-10)


def test_split_concat_deployed_state_dict_loads_strict():
    def build(deployed: bool = False) -> rs.Concat:
        return rs.Concat(
            nn.Identity(), nn.Conv2d(4, 4, 3, padding=1, groups=2), split=(4, 4), deployed=deployed
        )

    block = randomize(build().double(), _gen(17))
    state = rs.deploy(block).state_dict()
    built = build(deployed=True).double()
    assert built.conv.groups == 4  # identity half and 2-group half: 2x2 blocks on the diagonal
    built.load_state_dict(state, strict=True)
    x = _randn(2, 8, 6, 6)
    with torch.no_grad():
        assert_equivalent(built(x), block(x), 1e-10)


def test_split_refusals():
    with _raises(ValueError, "split=(2, 2)", "each of the 3 branches"):
        rs.Concat(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.Identity(), split=(2, 2))
    with _raises(ValueError, "branches.1 (Conv2d)", "3 input channels", "split gives it 2"):
        rs.Concat(nn.Conv2d(2, 2, 1), nn.Conv2d(3, 2, 1), split=(2, 2))
    with _raises(ValueError, "split=(2, 0)", "positive"):
        rs.Concat(nn.Conv2d(2, 2, 1), nn.Identity(), split=(2, 0))
    block = rs.Concat(nn.Conv2d(2, 2, 1), nn.Identity(), split=(2, 2))
    with _raises(ValueError, "split=(2, 2) needs 4 input channels, got 5"):
        block(torch.zeros(1, 5, 3, 3))


# --- hypothesis: Concat nodes inside chains and parallels, and containing them ---------------
def _has_concat(block: nn.Module) -> bool:
    return any(isinstance(m, rs.Concat) for m in block.modules())


@settings(max_examples=30)
@given(concat_examples())
def test_drawn_concat_squeezes_exactly_and_keeps_the_oracle_shape(ex: Example):
    block, x = ex.block, ex.input()
    assert _has_concat(block)
    with torch.no_grad():
        y = block(x)
        assert y.shape == naive(block, x).shape
        grown = ex.input(sizes=interior_sizes(block, ex.sizes))  # an input with an interior
        assert_interior_matches_naive(block, grown, block(grown), 1e-10)  # independent oracle
        conv = block.squeeze()
        note(f"squeezed: {conv}")
        assert type(conv) is CONV_CLASS[ex.ndim]
        assert conv.out_channels == y.shape[1]
        assert tuple(conv.stride) == expected_stride(block, ex.ndim)
        assert_equivalent(conv(x), y, 1e-10)
        assert_equivalent(copy.deepcopy(block).float().squeeze()(x.float()), y, 1e-5)
        deployed = rs.deploy(block)
        assert list(deployed.state_dict()) == ["conv.weight", "conv.bias"]
        assert_equivalent(deployed(x), y, 1e-10)
        for m in block.modules():  # deploying inner Concats first changes nothing
            if isinstance(m, rs.Concat) and m is not block and m.ndim is not None:
                m.deploy()
        assert_equivalent(block(x), y, 1e-10)
        assert_equivalent(block.squeeze()(x), y, 1e-10)


@settings(max_examples=15)
@given(concat_examples())
def test_drawn_concat_online_equals_chain(ex: Example):
    """BatchNorms are in eval mode and fold live; gradients through the composition."""
    assert_matches_chain(ex.block, ex.input(), 1e-10)


# --- refusals ------------------------------------------------------------------------------------
def test_misaligned_concat_branch():
    with _raises(
        ValueError, "branches.2 (Conv2d)", "misaligned", "branches.0 (Conv2d)", "pad_left"
    ):
        rs.Concat(nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(3, 2, 3))


def test_concat_branches_with_different_strides():
    with _raises(ValueError, "branches.1 (Sequential)", "stride", "concatenated branches"):
        rs.Concat(
            nn.Conv2d(3, 2, 3, stride=2, padding=1),
            nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)),
        )


def test_concat_branches_with_different_input_channels():
    with _raises(ValueError, "branches.2 (BatchNorm2d)", "5 input channels", "branches.0 (Conv2d)"):
        rs.Concat(nn.Conv2d(3, 2, 1), nn.Identity(), nn.BatchNorm2d(5))


def test_concat_branches_with_mixed_padding_modes():
    with _raises(
        ValueError, "branches.1 (Sequential)", "padding_mode='reflect'", "branches.0 (Conv2d)"
    ):
        rs.Concat(
            nn.Conv2d(3, 2, 3, padding=1),
            nn.Sequential(nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")),
        )


def test_concat_whose_branches_all_keep_channels_is_refused():
    with _raises(ValueError, "Concat", "no branch fixes the number of input channels"):
        rs.Concat(nn.Identity(), nn.AvgPool2d(3, 1, 1))


def test_concat_needs_a_branch_and_refuses_nonlinear_ones():
    with _raises(ValueError, "Concat needs at least one branch"):
        rs.Concat()
    with _raises(TypeError, "branches.1.1 (ReLU)"):
        rs.Concat(nn.Conv2d(3, 2, 1), nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()))


def test_concat_nested_in_a_parallel_must_match_its_channels():
    concat = rs.Concat(nn.Conv2d(3, 2, 1), nn.Identity())  # 3 -> 5 channels
    with _raises(ValueError, "branches.1 (Conv2d)", "4 output channels"):
        rs.Parallel(concat, nn.Conv2d(3, 4, 1))


# --- mode="auto" cost model ----------------------------------------------------------------------
def test_auto_cost_of_a_concat_sums_its_branches_and_does_not_depend_on_nesting():
    def build() -> rs.Concat:
        torch.manual_seed(0)
        return rs.Concat(nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(16, 4, 1))

    top, nested = build().set_mode("auto"), rs.SqueezableBlock(build(), mode="auto")
    h, w = 8, 10
    costs = top.macs((16, h, w), batch=2)
    assert costs["chain"] == 2 * h * w * (8 * 16 * 9 + 4 * 16)
    assert costs["online"] == 2 * h * w * 12 * 16 * 9  # one 3x3 conv, nothing multiplied
    assert nested.macs((16, h, w), batch=2) == costs
    # the 1x1 branch grows to 3x3 in the composed kernel: running the branches is cheaper
    assert choose_by_macs(top, (2, 16, h, w), 2) == "chain"
    wide = rs.Concat(nn.Sequential(nn.Conv2d(16, 64, 1), nn.Conv2d(64, 8, 3, padding=1)))
    assert choose_by_macs(wide, (2, 16, h, w), 2) == "online"


def test_auto_cost_of_a_pool_first_branch():
    """A branch that starts with a channel-keeping layer (AvgPool -> 1x1, as in Inception)
    takes its channel count from the next layer in the composition cost."""
    block = rs.Parallel(
        nn.Conv2d(8, 8, 1), nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(8, 8, 1))
    )
    costs = block.macs((8, 5, 5))
    assert costs["online"] == 5 * 5 * 8 * 8 * 9 + 8 * 8 * 8 * 1 * 9  # conv + compose 1x1 o pool
    block = randomize(block.double(), _gen(13)).set_mode("auto")
    assert_matches_chain(block, _randn(2, 8, 5, 5), 1e-10, mode="auto")
