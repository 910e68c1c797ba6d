"""Core behaviour: the ORIGIN example, training, train-mode BatchNorm, deployed constructors,
whole-model deploy, foreign blocks, SyncBatchNorm, gradients and devices."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_equivalent,
    assert_gradients_match_finite_differences,
    max_err,
    randomize,
)
from torch import nn

import repsqueeze as rs

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 1, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


# --- (a) the ORIGIN example ------------------------------------------------------------------
def _origin_convs(bias: bool) -> tuple[nn.Conv2d, nn.Conv2d]:
    conv1 = nn.Conv2d(5, 3, 3, padding=1, bias=bias, dtype=F64)
    conv2 = nn.Conv2d(3, 1, 3, padding=1, bias=bias, dtype=F64)
    randomize(nn.Sequential(conv1, conv2), _gen())
    return conv1, conv2


@pytest.mark.parametrize("size", [6, 7])
def test_origin_naive_chain_differs_only_at_the_border(size):
    conv1, conv2 = _origin_convs(bias=True)
    block = rs.SqueezableBlock(conv1, conv2)
    x = _randn(1, 5, size, size)
    with torch.no_grad():
        out, naive = block(x), conv2(conv1(x))
        diff = (out - naive).abs()[0, 0]
    assert out.shape == naive.shape == (1, 1, size, size)
    interior = diff[1:-1, 1:-1]  # every pixel whose window in conv2 stays inside conv1's output
    border = diff.clone()
    border[1:-1, 1:-1] = 0
    assert interior.max() <= 1e-12
    assert interior[1:-1, 1:-1].max() <= 1e-12  # in particular >= 2 away from each border
    assert border.max() > 0.05 * out.abs().max()  # the mismatch the forum post ran into


def test_origin_block_equals_padding_2_then_0():
    """ptrblck's suggestion (padding 2 then 0) is exactly what the block computes."""
    conv1, conv2 = _origin_convs(bias=True)
    block = rs.SqueezableBlock(conv1, conv2)
    x = _randn(2, 5, 7, 7)
    with torch.no_grad():
        ref = torch.conv2d(
            torch.conv2d(x, conv1.weight, conv1.bias, padding=2), conv2.weight, conv2.bias
        )
        assert max_err(block(x), ref) <= 1e-12


def test_origin_squeeze_is_one_5x5_conv():
    conv1, conv2 = _origin_convs(bias=True)
    block = rs.SqueezableBlock(conv1, conv2)
    conv = block.squeeze()
    assert type(conv) is nn.Conv2d
    assert (conv.in_channels, conv.out_channels) == (5, 1)
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2) and conv.stride == (1, 1)
    assert conv.weight.dtype == F64
    x = _randn(3, 5, 7, 9)
    with torch.no_grad():
        assert_equivalent(conv(x), block(x), 1e-10)


def test_origin_kernel_composition_matches_squeeze():
    conv1, conv2 = _origin_convs(bias=False)
    k1, k2 = conv1.weight.detach(), conv2.weight.detach()
    composed = torch.conv2d(k1.permute(1, 0, 2, 3), k2.flip(-1, -2), padding=2).permute(1, 0, 2, 3)
    conv = rs.SqueezableBlock(conv1, conv2).squeeze()
    assert composed.shape == conv.weight.shape == (1, 5, 5, 5)
    assert max_err(conv.weight, composed) <= 1e-12
    assert conv.bias.abs().max() == 0


def test_origin_with_batchnorm_in_the_middle():
    block = rs.SqueezableBlock(
        nn.Conv2d(5, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 1, 3, padding=1)
    )
    randomize(block.double(), _gen()).eval()
    x = _randn(2, 5, 7, 7)
    conv = block.squeeze()
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2)
    with torch.no_grad():
        assert_equivalent(conv(x), block(x), 1e-10)


# --- (b) training ----------------------------------------------------------------------------
def _chain_block() -> nn.Module:
    return rs.SqueezableBlock(
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1)
    )


@pytest.mark.parametrize(
    "make", [_chain_block, lambda: rs.RepVGGBlock(4, 4)], ids=["chain", "repvgg"]
)
def test_training_reduces_loss_then_squeezes_exactly(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(16, 4, 9, 9)
    teacher = nn.Conv2d(4, 4, 3, padding=1)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    model.train()
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    conv = model.squeeze()
    assert conv.weight.dtype == torch.float32
    x = torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        assert_equivalent(conv(x), model(x), 1e-5)
        assert_equivalent(rs.deploy(model)(x), model(x), 1e-5)


# --- (c) train-mode BatchNorm ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_mode_bn_uses_interior_statistics(mode, momentum):
    conv1 = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode, dtype=F64)
    bn = nn.BatchNorm2d(4, momentum=momentum, dtype=F64)
    conv2 = nn.Conv2d(4, 2, 3, padding=1, padding_mode=mode, dtype=F64)
    randomize(nn.Sequential(conv1, bn, conv2), _gen())
    naive = copy.deepcopy(nn.Sequential(conv1, bn, conv2)).train()
    block = rs.SqueezableBlock(conv1, bn, conv2).train()
    x = _randn(4, 3, 9, 7)
    for _ in range(2):
        y, y_naive = block(x), naive(x)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            ours, ref = getattr(block.layers[1], name), getattr(naive[1], name)
            assert max_err(ours, ref) <= 1e-12, name
        assert y.shape == y_naive.shape
        assert max_err(y[..., 1:-1, 1:-1], y_naive[..., 1:-1, 1:-1]) <= 1e-10


def test_train_mode_bn_between_strided_and_padded_convs():
    layers = [
        nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=F64),
        nn.BatchNorm2d(4, dtype=F64),
        nn.Conv2d(4, 2, (3, 5), padding=(1, 2), dtype=F64),
    ]
    randomize(nn.Sequential(*layers), _gen())
    naive = copy.deepcopy(nn.Sequential(*layers)).train()
    block = rs.SqueezableBlock(*layers).train()
    x = _randn(4, 3, 11, 9)
    y, y_naive = block(x), naive(x)
    assert y.shape == y_naive.shape
    assert max_err(block.layers[1].running_mean, naive[1].running_mean) <= 1e-12
    assert max_err(block.layers[1].running_var, naive[1].running_var) <= 1e-12
    assert max_err(y[..., 1:-1, 2:-2], y_naive[..., 1:-1, 2:-2]) <= 1e-10


def test_train_mode_leading_bn_normalises_the_input_only():
    """A BN in front of a padded conv sees the padded input but takes statistics of x alone."""
    layers = [nn.BatchNorm2d(3, dtype=F64), nn.Conv2d(3, 4, 3, padding=1, dtype=F64)]
    randomize(nn.Sequential(*layers), _gen())
    naive = copy.deepcopy(nn.Sequential(*layers)).train()
    block = rs.SqueezableBlock(*layers).train()
    x = _randn(4, 3, 7, 9)
    y, y_naive = block(x), naive(x)
    assert max_err(block.layers[0].running_mean, naive[0].running_mean) <= 1e-12
    assert max_err(block.layers[0].running_var, naive[0].running_var) <= 1e-12
    assert max_err(y[..., 1:-1, 1:-1], y_naive[..., 1:-1, 1:-1]) <= 1e-10


# --- (d) deployed constructors ---------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 4, "out_channels": 4},
        {"in_channels": 4, "out_channels": 8, "stride": 2},
        {"in_channels": 4, "out_channels": 4, "kernel_size": 4},  # even: padding='same'
        {"in_channels": 3, "out_channels": 3, "kernel_size": 5, "dilation": 2, "groups": 3},
        {"in_channels": 2, "out_channels": 2, "padding_mode": "reflect", "dims": 1},
        {"in_channels": 2, "out_channels": 4, "padding_mode": "circular", "dims": 3},
    ],
)
def test_repvgg_deployed_constructor_loads_deployed_state_dict(kwargs):
    trained = randomize(rs.RepVGGBlock(**kwargs), _gen()).eval()
    deployed = rs.deploy(trained)
    fresh = rs.RepVGGBlock(**kwargs, deployed=True)
    assert fresh.deployed
    fresh.load_state_dict(deployed.state_dict(), strict=True)
    fresh.eval()
    dims = kwargs.get("dims", 2)
    x = _randn(2, kwargs["in_channels"], *(7,) * dims, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(fresh(x), deployed(x))
        assert_equivalent(fresh(x), trained(x), 1e-5)


def _generic_layers() -> list[nn.Module]:
    return [
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 6, (3, 2), stride=2, padding=1, padding_mode="replicate"),
        nn.BatchNorm2d(6),
        rs.Parallel(nn.Conv2d(6, 4, 3, padding=1, padding_mode="replicate"), nn.Conv2d(6, 4, 1)),
    ]


def test_generic_deployed_constructor_loads_deployed_state_dict():
    trained = randomize(rs.SqueezableBlock(*_generic_layers()), _gen()).eval()
    deployed = rs.deploy(trained)
    fresh = rs.SqueezableBlock(*_generic_layers(), deployed=True).eval()
    assert fresh.deployed and list(fresh.state_dict()) == list(deployed.state_dict())
    fresh.load_state_dict(deployed.state_dict(), strict=True)
    x = _randn(2, 3, 9, 11, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(fresh(x), deployed(x))
        assert_equivalent(fresh(x), trained(x), 1e-5)


# --- (e) whole models ------------------------------------------------------------------------
def _model() -> nn.Module:
    return nn.Sequential(
        rs.SqueezableBlock(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1)),
        nn.ReLU(),
        rs.Parallel(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
            nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)),
            nn.BatchNorm2d(8),
        ),
        nn.ReLU(),
        rs.RepVGGBlock(8, 16, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_model_deploy_with_nonlinearities_between_blocks():
    model = randomize(_model(), _gen()).eval()
    before = copy.deepcopy(model.state_dict())
    x = _randn(2, 3, 11, 9, dtype=torch.float32)
    with torch.no_grad():
        ref = model(x)
        deployed = rs.deploy(model)
        assert_equivalent(deployed(x), ref, 1e-5)
        assert torch.equal(model(x), ref)  # the original is untouched
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    blocks = [m for m in deployed.modules() if isinstance(m, rs.Squeezable)]
    assert len(blocks) == 3 and all(b.deployed for b in blocks)

    fresh = _model()
    assert rs.deploy(fresh, inplace=True) is fresh
    fresh.load_state_dict(deployed.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), deployed(x))


# --- (f) foreign blocks ----------------------------------------------------------------------
@pytest.mark.parametrize("hook", ["switch_to_deploy", "reparameterize", "fuse"])
def test_deploy_calls_foreign_hooks(hook):
    class Foreign(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0
            self.inner = rs.RepVGGBlock(2, 2)

        def forward(self, x):
            return self.inner(x)

    def switch(self):  # in place, and returns a replacement (timm's fuse() convention)
        self.calls += 1
        return nn.Sequential(self.inner)

    setattr(Foreign, hook, switch)
    model = nn.Sequential(nn.Conv2d(2, 2, 1), Foreign())
    out = rs.deploy(model)
    assert type(out[1]) is nn.Sequential and model[1].calls == 0  # the child is replaced
    assert out[1][0].deployed and not model[1].inner.deployed  # the replacement is walked too
    rs.deploy(model, inplace=True)
    assert type(model[1]) is nn.Sequential and model[1][0].deployed


# --- (g) SyncBatchNorm -----------------------------------------------------------------------
def test_sync_batchnorm_squeezes_exactly():
    model = nn.Sequential(
        rs.SqueezableBlock(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)),
        nn.ReLU(),
        rs.RepVGGBlock(4, 4),
    )
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == 4
    randomize(model.double(), _gen()).eval()
    x = _randn(2, 3, 9, 9)
    with torch.no_grad():
        for block in (model[0], model[2]):
            h = x if block is model[0] else model[1](model[0](x))
            assert_equivalent(block.squeeze()(h), block(h), 1e-10)
        assert_equivalent(rs.deploy(model)(x), model(x), 1e-10)


# --- (h) gradients ---------------------------------------------------------------------------
def test_gradient_reaches_every_branch():
    model = nn.Sequential(
        rs.SqueezableBlock(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            rs.Parallel(
                nn.Conv2d(4, 4, 3, padding=1), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
            ),
        ),
        nn.ReLU(),
        rs.RepVGGBlock(4, 4, padding_mode="reflect"),
    ).train()
    model = randomize(model.double(), _gen())
    x = _randn(4, 3, 7, 7)
    assert_gradients_match_finite_differences(model, x)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, name


# --- dtype and device of the squeezed conv ---------------------------------------------------
def test_squeeze_dtype_follows_buffers_without_parameters():
    """A block whose only layer is an affine-free BN has buffers but no parameters."""
    block = rs.SqueezableBlock(nn.BatchNorm2d(3, affine=False)).double()
    randomize(block, _gen()).eval()
    conv = block.squeeze()
    assert conv.weight.dtype == F64
    x = _randn(2, 3, 5, 5)
    with torch.no_grad():
        assert_equivalent(conv(x), block(x), 1e-10)


def test_squeeze_of_deployed_block_is_a_copy():
    block = rs.RepVGGBlock(2, 2).eval().deploy()
    conv = block.squeeze()
    assert conv is not block.conv
    with torch.no_grad():
        conv.weight.zero_()
    assert block.conv.weight.abs().sum() > 0


@pytest.mark.gpu
def test_squeeze_on_cuda_keeps_device_and_dtype():
    block = randomize(rs.RepVGGBlock(4, 4).double(), _gen()).eval().cuda()
    conv = block.squeeze()
    assert conv.weight.device.type == "cuda" and conv.weight.dtype == F64
    x = _randn(2, 4, 9, 9).cuda()
    with torch.no_grad():
        assert_equivalent(conv(x), block(x), 1e-10)
        assert_equivalent(rs.deploy(block)(x), block(x), 1e-10)
