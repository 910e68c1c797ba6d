"""expand() on existing models and make_border_consistent() on naively trained chains."""

import copy

import pytest
import torch
import torchvision
from helpers import randomize_bn
from torch import nn

import repsqueeze as rs
from repsqueeze.zoo import BLOCKS

KINDS = [k for k in BLOCKS if k != "qarepvgg"]  # refused by expand (test_quant.py)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    randomize_bn(model, torch.Generator().manual_seed(0))
    return model.eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.mark.slow  # ~47 s for the seven kinds on 2 cores
@pytest.mark.parametrize("kind", KINDS)
def test_expand_resnet18_keeps_function_and_deploys_to_same_shapes(resnet18, kind, single_thread):
    x = torch.randn(2, 3, 48, 48)
    expanded, report = rs.expand(resnet18, block=kind, return_report=True)
    assert len(report.expanded) == 20  # every conv of a ResNet-18 is followed by a BatchNorm
    assert report.skipped == []
    assert sum(isinstance(m, rs.Squeezable) for m in expanded.modules()) >= 20
    expanded.eval()
    with torch.no_grad():
        reference = resnet18(x)
        assert _relative(expanded(x), reference) <= 1e-5
        deployed = rs.deploy(expanded)
        assert _relative(deployed(x), reference) <= 1e-5
    for path in report.expanded:
        assert (
            deployed.get_submodule(path).conv.weight.shape
            == resnet18.get_submodule(path).weight.shape
        )
    # the original is untouched
    assert isinstance(resnet18.conv1, nn.Conv2d) and isinstance(resnet18.bn1, nn.BatchNorm2d)


def test_expand_keeps_training_mode_function(single_thread):
    """Extra branches end in zero-scale BatchNorms: zero in training mode as well."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(4, 3, 9, 9)
    for kind in KINDS:
        expanded = rs.expand(model, block=kind).train()
        reference = copy.deepcopy(model).train()
        assert _relative(expanded(x), reference(x)) <= 1e-5, kind


def test_expand_folds_conv_bias_and_trains(single_thread):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU())
    randomize_bn(model, torch.Generator().manual_seed(2))
    model.eval()
    x = torch.randn(2, 3, 7, 7)
    expanded = rs.expand(model, block="dbb").eval()
    assert _relative(expanded(x), model(x)) <= 1e-5
    expanded.train()
    opt = torch.optim.SGD(expanded.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        expanded(x).square().mean().backward()
        opt.step()
    idle = [n for n, p in expanded.named_parameters() if p.grad is None or not p.grad.any()]
    assert idle == []  # zero-scale branches get gradient through their scales, then learn
    expanded.eval()
    assert _relative(rs.deploy(expanded)(x), expanded(x)) <= 1e-5


def test_expand_ck_embeds_large_kernels_exactly(single_thread):
    """A 7x7 conv becomes three 3x3 convs: shifted copies, then the mixing layer (the
    4 * 16 hidden channels hold the 25 shifts of 2 input channels)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16))
    randomize_bn(model, torch.Generator().manual_seed(3))
    model = model.double().eval()
    x = torch.randn(2, 2, 15, 15, dtype=torch.float64)
    expanded = rs.expand(model, block="expand_ck").eval()
    block = expanded[0]
    assert [c.kernel_size for c in block.layers[:-1]] == [(3, 3)] * 3
    assert _relative(expanded(x), model(x)) <= 1e-12


@pytest.mark.parametrize("expansion", [1, 2, 3, 4])
def test_expand_ck_any_expansion_is_exact_or_skipped(expansion, single_thread):
    """A 5x5 kernel needs 9 * in_channels hidden channels (expansion * out_channels): 2 * 9
    = 18 > 8 * expansion for expansion 1 and 2, which are skipped with the reason; a 3x3
    kernel embeds at any expansion."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 5, padding=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
    )  # fmt: skip
    randomize_bn(model, torch.Generator().manual_seed(4))
    model = model.double().eval()
    x = torch.randn(2, 2, 11, 11, dtype=torch.float64)
    expanded, report = rs.expand(model, block="expand_ck", expansion=expansion, return_report=True)
    assert "3" in report.expanded
    if expansion * 8 < 18:
        assert report.skipped == [("0", f"expand_ck needs >= 18 hidden channels for an exact "
                                        f"start, has {8 * expansion} (expansion * out_channels); "
                                        "raise expansion")]  # fmt: skip
    else:
        assert list(report.expanded) == ["0", "3"]
        assert expanded[0].layers[0].out_channels == 8 * expansion
    assert _relative(expanded(x), model(x)) <= 1e-12
    with pytest.raises(ValueError, match="hidden channels"):
        rs.ExpandedConv.from_conv_bn(model[0], model[1], expansion=1)


@pytest.mark.parametrize("kind", KINDS)
def test_from_conv_bn_is_exact_in_eval_and_training(kind, single_thread):
    """Every kind's from_conv_bn computes bn(conv(x)), conv bias and BN eps included."""
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=True).double()
    bn = nn.BatchNorm2d(6, eps=1e-3, momentum=0.3).double()
    randomize_bn(bn, torch.Generator().manual_seed(5))
    block = BLOCKS[kind].from_conv_bn(conv.eval(), bn)
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    bn.eval()
    assert _relative(block.eval()(x), bn(conv(x))) <= 1e-12
    assert all(m.eps == 1e-3 for m in block.modules() if isinstance(m, nn.BatchNorm2d))
    assert _relative(block.train()(x), bn.train()(conv(x))) <= 1e-12  # batch statistics


def test_expand_lists_ineligible_layers(single_thread):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),  # no BatchNorm after it
        nn.Conv2d(4, 4, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(4),  # not square
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(4),  # dilated
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),  # eligible
    )  # fmt: skip
    expanded, report = rs.expand(model, block="repvgg", return_report=True)
    reasons = dict(report.skipped)
    assert "BatchNorm" in reasons["0"]
    assert "square" in reasons["2"]
    assert "dilation" in reasons["4"]
    assert list(report.expanded) == ["6"]
    assert isinstance(expanded[6], rs.RepVGGBlock) and isinstance(expanded[7], nn.Identity)


def test_expand_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown block kind"):
        rs.expand(nn.Conv2d(1, 1, 3), block="nope")


# --- make_border_consistent: the answer for the person in ORIGIN.txt ---------------------------
def _origin_chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(5, 3, 3, padding=1), nn.Conv2d(3, 1, 3, padding=1)).double()


def test_border_consistent_origin_chain(single_thread):
    chain = _origin_chain()
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    new, report = rs.make_border_consistent(chain, sample=x)
    assert list(report.rewritten) == ["0"] and report.rewritten["0"] == ["0", "1"]
    assert isinstance(new[0], rs.SqueezableBlock)
    assert new[0].layers[0].weight.data_ptr() != chain[0].weight.data_ptr()  # a copy
    torch.testing.assert_close(new[0].layers[0].weight, chain[0].weight)
    old, y = chain(x), new(x)
    # interior (2 pixels from each border) unchanged, border moved, and the move reported
    torch.testing.assert_close(y[..., 2:-2, 2:-2], old[..., 2:-2, 2:-2], rtol=0, atol=1e-12)
    assert (y - old).abs().max() > 1e-3
    assert report.interior_change["0"] <= 1e-12
    assert report.border_change["0"] == pytest.approx(
        float((y - old).abs().max() / old.abs().max())
    )
    assert report.output_change > 1e-3
    # afterwards the squeeze is exact: one 5x5 conv with padding 2
    conv = new[0].squeeze()
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2)
    torch.testing.assert_close(conv(x), y, rtol=0, atol=1e-10)


def test_border_consistent_with_bn_between_and_nonlinearity(single_thread):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),  # alone after the ReLU: already exact, left alone
    )  # fmt: skip
    new, report = rs.make_border_consistent(model)
    assert list(report.rewritten) == ["0"]
    assert isinstance(new[0], rs.SqueezableBlock) and len(new[0].layers) == 3
    assert isinstance(new[-1], nn.Conv2d)


def test_border_consistent_skips_mixed_padding_modes():
    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 3, padding=1)
    )
    new, report = rs.make_border_consistent(model)
    assert report.rewritten == {}
    assert "padding_mode" in report.skipped[0][1]
    assert isinstance(new[0], nn.Conv2d)


def test_border_consistent_inplace():
    chain = _origin_chain()
    same, _ = rs.make_border_consistent(chain, inplace=True)
    assert same is chain and isinstance(chain[0], rs.SqueezableBlock)


def test_deploy_walker_reparameterizes_timm_blocks(single_thread):
    """timm's RepVGG blocks follow the reparameterize() convention: the same walker deploys them."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=10)
    randomize_bn(model, torch.Generator().manual_seed(0))
    model.eval()
    deployed = rs.deploy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.stages.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.stages.modules())  # original kept
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _relative(deployed(x), model(x)) <= 1e-5


def test_border_consistent_measurement_leaves_modes_and_statistics_alone():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1)
    )
    model.train()
    new, _ = rs.make_border_consistent(model, sample=torch.randn(2, 3, 7, 7))
    assert all(m.training for m in new.modules()) and all(m.training for m in model.modules())
    assert int(new[0].layers[1].num_batches_tracked) == 0
    assert int(model[1].num_batches_tracked) == 0
