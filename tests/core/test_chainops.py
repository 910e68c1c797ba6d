"""Chain mode's BatchNorm before a constant border, from one set of statistics, and
recomputation: exact against independent oracles (autograd through ``var_mean``, the naive
chain, ``gradcheck``, the same block without recomputation), running statistics included."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equivalent, bn_and_pad, randomize, saved_bytes
from torch import Tensor, nn

import repsqueeze as rs
from repsqueeze.core import chainops
from repsqueeze.models import create_model
from repsqueeze.zoo import make_block

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(bn: nn.BatchNorm2d, x: Tensor, fill: Tensor) -> tuple[Tensor, Tensor]:
    """Autograd through explicit statistics; running statistics as ``bn(x)`` updates them."""
    var, mean = torch.var_mean(x, [0, 2, 3], correction=0)
    scale = torch.rsqrt(var + bn.eps)
    scale = scale * bn.weight if bn.affine else scale
    shift = bn.bias if bn.affine else torch.zeros_like(mean)
    return bn(x), shift + (fill - mean) * scale


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_border_values_gradients_and_running_stats_match_explicit_statistics(momentum, affine):
    ours = nn.BatchNorm2d(3, momentum=momentum, affine=affine, dtype=F64)
    randomize(ours, _gen(0))
    ref = copy.deepcopy(ours)
    for step in range(3):  # momentum=None: the cumulative average over the steps
        x = torch.randn(4, 3, 5, 6, dtype=F64, generator=_gen(step + 1)) * 3 + 2
        fill = torch.randn(3, dtype=F64, generator=_gen(10 + step))
        x1, f1 = x.clone().requires_grad_(True), fill.clone().requires_grad_(True)
        x2, f2 = x.clone().requires_grad_(True), fill.clone().requires_grad_(True)
        y, border = chainops.batch_norm_with_border(ours, x1, f1)
        y_ref, border_ref = _reference(ref, x2, f2)
        assert_equivalent(y, y_ref, 1e-12)
        assert_equivalent(border, border_ref, 1e-12)
        gy = torch.randn(y.shape, dtype=F64, generator=_gen(20 + step))
        gb = torch.randn(3, dtype=F64, generator=_gen(30 + step))
        ((y * gy).sum() + (border * gb).sum()).backward()
        ((y_ref * gy).sum() + (border_ref * gb).sum()).backward()
        assert_equivalent(x1.grad, x2.grad, 1e-10)
        assert_equivalent(f1.grad, f2.grad, 1e-10)
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            assert_equivalent(p.grad, q.grad, 1e-10)
        for name in ("running_mean", "running_var"):
            assert_equivalent(getattr(ours, name), getattr(ref, name), 1e-12)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1


def test_border_batch_norm_and_pad_pass_gradcheck():
    """Both functions against finite differences: the interior, the border constant, and
    the weight and bias through both."""
    x = torch.randn(3, 2, 3, 4, dtype=F64, generator=_gen(2))
    fill, weight, bias = (torch.randn(2, dtype=F64, generator=_gen(s)) for s in (3, 4, 5))
    amount = ((1, 2), (0, 1))

    def normalise_then_pad(x, fill, weight, bias):
        y, border = chainops._BatchNormBorder.apply(x, fill, weight, bias, None, None, 0.0, 1e-5)
        return chainops.pad_filled(y, amount, border)

    inputs = tuple(t.requires_grad_(True) for t in (x, fill, weight, bias))
    assert torch.autograd.gradcheck(normalise_then_pad, inputs, fast_mode=True)
    out = normalise_then_pad(*inputs)
    assert out.shape == (3, 2, 6, 5)
    y = F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)
    assert_equivalent(out[..., 1:4, 0:4], y, 1e-12)  # the interior, copied
    ring = torch.ones(6, 5, dtype=torch.bool)
    ring[1:4, 0:4] = False
    border = out[..., ring]  # (3, 2, ring positions): one value per channel
    assert torch.equal(border, border[..., :1].expand_as(border))


def _dbb_pair(seed: int, **kw) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    block = randomize(make_block("dbb", 4, 6, **kw).double(), _gen(seed)).train()
    return block, copy.deepcopy(block)


class _CountingBatchNorm(nn.BatchNorm2d):
    """A BatchNorm with a ``forward`` of its own: the chain must call it as a module (explicit
    ``var_mean`` for the border), the independent path. ``calls`` counts its forwards."""

    calls: list = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(1)
        return super().forward(x)


def _force_explicit_statistics(block: nn.Module) -> list:
    """Turns every BatchNorm of ``block`` into a :class:`_CountingBatchNorm`; the list its
    forwards fill."""
    seen = _CountingBatchNorm.calls = []
    for m in block.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = _CountingBatchNorm
    return seen


@pytest.mark.parametrize("stride", [1, 2])
def test_dbb_chain_equals_the_explicit_statistics_path_values_gradients_running_stats(stride):
    fast, slow = _dbb_pair(3, stride=stride)
    seen = _force_explicit_statistics(slow)
    for step in range(2):
        x = torch.randn(3, 4, 9, 8, dtype=F64, generator=_gen(40 + step))
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = fast(x1), slow(x2)
        assert_equivalent(y1, y2, 1e-12)
        w = torch.randn(y1.shape, dtype=F64, generator=_gen(50 + step))
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        assert_equivalent(x1.grad, x2.grad, 1e-10)
        for p, q in zip(fast.parameters(), slow.parameters(), strict=True):
            assert_equivalent(p.grad, q.grad, 1e-10)
        for a, b in zip(fast.buffers(), slow.buffers(), strict=True):
            assert_equivalent(a, b, 1e-12)
    assert seen  # the BatchNorms ran as modules: the other path ran


def test_dbb_chain_in_float32_equals_its_branches_with_bn_and_pad():
    """The whole block in training mode, float32, against its four branches written out
    (the 1x1 -> BN chains padded with the BN's value at zero, from the batch statistics)."""
    torch.manual_seed(0)
    block = randomize(make_block("dbb", 4, 4), _gen(7)).train()
    branches = copy.deepcopy(block).branches
    x = torch.randn(4, 4, 10, 10, generator=_gen(8))
    kxk, one, chain, pool = branches
    conv1, bn1, conv2, bn2 = chain
    ref = kxk(x) + one(x)
    ref = ref + bn2(F.conv2d(bn_and_pad(bn1, conv1(x)), conv2.weight))
    ref = ref + pool[3](F.avg_pool2d(bn_and_pad(pool[1], pool[0](x)), 3, 1, 0))
    assert_equivalent(block(x), ref, 1e-5)


# --- recomputation ----------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, None])
def test_recompute_gives_the_same_values_gradients_and_one_statistics_update(momentum):
    plain, recomputed = _dbb_pair(5, stride=2)
    for block in (plain, recomputed):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
    recomputed.set_mode("chain", recompute=True)
    for step in range(2):
        x = torch.randn(3, 4, 9, 7, dtype=F64, generator=_gen(60 + step))
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = plain(x1), recomputed(x2)
        assert torch.equal(y1, y2)
        w = torch.randn(y1.shape, dtype=F64, generator=_gen(70 + step))
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        assert torch.equal(x1.grad, x2.grad)  # the same ops on the same values: bitwise
        for p, q in zip(plain.parameters(), recomputed.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)
        for (name, a), b in zip(plain.named_buffers(), recomputed.buffers(), strict=True):
            assert torch.equal(a, b), name
    counts = {m.num_batches_tracked.item() for m in recomputed.modules() if hasattr(m, "num_batches_tracked")}  # fmt: skip
    assert counts == {2}


def test_recompute_keeps_only_the_block_input():
    block = make_block("dbb", 8, 8).train()
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    kept = saved_bytes(copy.deepcopy(block).set_mode("chain", recompute=True), x, backward=True)
    assert kept == x.numel() * x.element_size()
    assert saved_bytes(block, x, backward=True) > 6 * kept


def test_recompute_brings_a_dbb_resnet_under_twice_the_plain_activations():
    x = torch.randn(2, 3, 16, 16)
    plain = saved_bytes(create_model("resnet20_cifar", block="plain").train(), x, backward=True)
    dbb = create_model("resnet20_cifar", block="dbb").train()
    assert saved_bytes(dbb, x, backward=True) > 4 * plain
    assert rs.set_mode(dbb, "chain", recompute=True) is dbb
    assert all(m.recompute for m in dbb.modules() if isinstance(m, rs.Squeezable))
    assert saved_bytes(dbb, x, backward=True) <= 2 * plain
    rs.set_mode(dbb, "chain")  # None: the setting stays
    assert all(m.recompute for m in dbb.modules() if isinstance(m, rs.Squeezable))
