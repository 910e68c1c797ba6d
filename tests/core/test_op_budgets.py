"""Online mode as cheap as its math, chain mode as lean as its structure.

Op counts are real ``torch.profiler`` counts (:func:`repsqueeze.core.cost.count_ops`: top-level
aten operators of one forward pass of a 64-channel block in training mode, on the CPU). The
op budgets (repvgg and acb online <= 15, dbb online <= 25, dbb chain <= 35) were set with a
harness that counts 2 operators of its own per block (input creation, reduction), so they
are asserted here as this count plus :data:`HARNESS`.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equivalent, bn_and_pad, randomize, saved_bytes
from torch import nn

import repsqueeze as rs
from repsqueeze.core import cost, online
from repsqueeze.zoo import make_block

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
HARNESS = 2  # operators the budgets' harness adds to every block (input creation, reduction)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _count(kind: str, mode: str, **kw) -> tuple[int, list[str]]:
    torch.manual_seed(0)
    block = make_block(kind, 64, 64, mode=mode, **kw).train()
    return cost.count_ops(block, torch.randn(2, 64, 8, 8))


def test_count_ops_sees_the_three_ops_of_a_plain_conv_bn():
    n, names = _count("plain", "chain")
    assert names == ["aten::conv2d", "aten::add_", "aten::batch_norm"]
    assert n == 3


@pytest.mark.parametrize(("kind", "target"), [("repvgg", 15), ("acb", 15), ("dbb", 25)])
def test_online_block_op_count_meets_its_budget(kind, target):
    n, names = _count(kind, "online", online_norm=True)
    assert n + HARNESS <= target, names
    # no host-device synchronisation, no dense C x C scale matrices, no index assignment
    for bad in ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::eye"):
        assert bad not in names
    assert not any(name.startswith(("aten::index_put", "aten::copy_")) for name in names)
    assert names.count("aten::conv2d") == 1


def test_dbb_chain_op_count_dropped():
    n, names = _count("dbb", "chain")
    assert n + HARNESS <= 35, names  # BatchNorm and the border constant as one op each
    # the border constant comes from the statistics BatchNorm computes anyway (no second
    # reduction); the two BatchNorms before a border run as one op each (repsqueeze.core.chainops)
    assert "aten::var_mean" not in names
    assert names.count("aten::batch_norm") == 4  # the others native


# --- composition in the parameters' dtype, plan rebuilt when a child is replaced -------------
@pytest.mark.parametrize("kind", ["repvgg", "dbb", "expand_cl"])
def test_online_composes_in_the_parameters_dtype(kind):
    block = make_block(kind, 4, 4, mode="online", online_norm=kind != "expand_cl")
    weight, _ = online.composed(block, 2)
    assert weight.dtype == torch.float32
    assert weight.requires_grad
    weight, _ = online.composed(block.double(), 2)
    assert weight.dtype == F64


def test_online_plan_is_rebuilt_when_a_child_is_swapped():
    torch.manual_seed(0)
    block = rs.Parallel(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), mode="online")
    x = torch.randn(2, 3, 7, 7, dtype=F64)
    block.double()(x)
    assert online.plan(block, 2).layout.kernel_size == (3, 3)
    block.branches[1] = nn.Conv2d(3, 4, 5, padding=2).double()
    y = block(x)
    assert online.plan(block, 2).layout.kernel_size == (5, 5)
    expected = block.branches[0](x) + block.branches[1](x)
    assert_equivalent(y, expected, 1e-10)


def test_online_composes_a_nested_concatenation_through_the_dense_path():
    torch.manual_seed(0)
    inner = rs.Concat(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4))
    block = rs.SqueezableBlock(nn.Conv2d(3, 4, 1), inner, nn.Conv2d(8, 2, 3, padding=1))
    block = randomize(block.double(), _gen(1)).eval()
    x = torch.randn(2, 3, 8, 8, dtype=F64, generator=_gen(2))
    chain, on = copy.deepcopy(block), copy.deepcopy(block).set_mode("online")
    assert_equivalent(on(x), chain(x), 1e-10)
    top = randomize(rs.Concat(nn.Conv2d(3, 3, 3, padding=1), nn.Identity()).double(), _gen(3))
    assert_equivalent(copy.deepcopy(top).set_mode("online")(x), top(x), 1e-10)


# --- chain mode: BatchNorm on the interior, border as its per-channel constant ----------------
def test_chain_bn_after_pointwise_conv_runs_natively_and_pads_with_its_constant():
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4)
    )
    seq = randomize(seq.double(), _gen(4)).train()
    block = rs.SqueezableBlock(copy.deepcopy(seq))
    x = torch.randn(4, 3, 6, 7, dtype=F64, generator=_gen(5), requires_grad=True)
    conv1, bn = block.layers[0][:2]
    before = bn.running_mean.clone()
    y = block(x)
    x2 = x.detach().clone().requires_grad_(True)
    conv1_, bn1_, conv3_, bn2_ = seq  # the oracle: DBB's BN-and-pad, at the conv's bias
    z = bn_and_pad(bn1_, conv1_(x2), fill=conv1_.bias)
    out = F.conv2d(z, conv3_.weight, conv3_.bias)
    ref = F.batch_norm(out, None, None, bn2_.weight, bn2_.bias, training=True, eps=bn2_.eps)
    assert_equivalent(y, ref, 1e-10)
    w = torch.randn(y.shape, dtype=F64, generator=_gen(6))
    (y * w).sum().backward()
    (ref * w).sum().backward()
    assert_equivalent(x.grad, x2.grad, 1e-10)
    for p, q in zip(block.layers.parameters(), seq.parameters(), strict=True):
        assert_equivalent(p.grad, q.grad, 1e-10)
    assert bn.num_batches_tracked.item() == 1  # statistics of the interior, updated once
    with torch.no_grad():
        expected = 0.9 * before + 0.1 * conv1(x).mean((0, 2, 3))
    assert_equivalent(bn.running_mean, expected, 1e-10)


def test_dbb_chain_saves_one_tensor_per_layer_output_that_backward_needs():
    """x, the kxk and 1x1 outputs, 1x1 -> BN -> (padded) -> kxk: three, 1x1 -> BN ->
    (padded) -> pool: three; nothing else of activation size (no hand-written BN temporaries,
    no padded input copies)."""
    block = make_block("dbb", 8, 8).train()
    x = torch.randn(4, 8, 16, 16)
    one = x.numel() * x.element_size()
    padded = 4 * 8 * 18 * 18 * x.element_size()
    assert saved_bytes(block, x) <= 5 * one + 4 * padded
