"""Interop with timm and torchvision: deploy, expand / contract and from_timm.

Oracles: timm's own blocks (their forward in eval and training mode), torchvision's and
timm's original models. The official state dicts are tested in test_official_weights.py.
"""

import copy

import pytest
import torch
import torchvision
from helpers import randomize, randomize_bn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.usefixtures("single_thread")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bns(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


# --- rs.deploy follows timm's fuse() convention ------------------------------------------------
def _timm_fusable() -> list[tuple[str, nn.Module]]:
    from timm.models import efficientvit_msra, levit, repvit, tiny_vit

    return [
        ("levit.ConvNorm", levit.ConvNorm(4, 8, 3, 1, 1)),
        ("repvit.RepVggDw", repvit.RepVggDw(8, 3)),
        ("repvit.RepVggDw(legacy)", repvit.RepVggDw(8, 3, legacy=True)),
        ("efficientvit_msra.ConvNorm", efficientvit_msra.ConvNorm(8, 8, 3, 2, 1, groups=2)),
        ("tiny_vit.ConvNorm", tiny_vit.ConvNorm(8, 4, 3, 1, 1)),
    ]


@pytest.mark.parametrize("index", range(5))
def test_deploy_replaces_timm_blocks_by_what_fuse_returns(index):
    name, module = _timm_fusable()[index]
    randomize(module, _gen(index)).eval()
    c_in = next(m for m in module.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, c_in, 9, 9, generator=_gen(10 + index))
    with torch.no_grad():
        ref = module(x)
        alone = rs.deploy(module)  # top level: the replacement is returned
        nested = rs.deploy(nn.Sequential(module, nn.ReLU()))
        assert _bns(alone) == [] and _bns(nested) == [], name
        assert _relative(alone(x), ref) <= 1e-5, name
        assert _relative(nested(x), ref.relu()) <= 1e-5, name
    assert _bns(module), "the original is left as it was"


def test_deploy_skips_hooks_that_need_arguments():
    class Needs(nn.Module):
        called = False

        def fuse(self, other):  # e.g. torch.ao-style fuse(modules): not ours to call
            Needs.called = True

        def forward(self, x):
            return x

    class Optional(nn.Module):
        def fuse(self, scale=2.0):
            return nn.Identity()

        def forward(self, x):
            return 3 * x

    class Wraps(nn.Module):  # a replacement that holds the old module: its hook runs once
        calls = 0

        def switch_to_deploy(self):
            Wraps.calls += 1
            return nn.Sequential(self, nn.ReLU())

        def forward(self, x):
            return x

    class ChildNamedFuse(nn.Module):  # a layer called "fuse" is no hook
        def __init__(self):
            super().__init__()
            self.fuse = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.fuse(x)

    out = rs.deploy(nn.Sequential(Needs(), Optional(), Wraps(), ChildNamedFuse()))
    assert not Needs.called and isinstance(out[0], Needs)
    assert isinstance(out[1], nn.Identity)
    assert Wraps.calls == 1 and isinstance(out[2][0], Wraps)
    assert isinstance(out[3].fuse, nn.Conv2d)


def test_timm_reparameterize_model_deploys_our_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(
        rs.RepVGGBlock(3, 8),
        nn.ReLU(),
        rs.DiverseBranchBlock(8, 8, stride=2),
        nn.ReLU(),
        rs.make_block("expand_cl", 8, 4),
        nn.Sequential(rs.ACBlock(4, 4), nn.ReLU()),
    )
    randomize(model, _gen()).eval()
    x = torch.randn(2, 3, 12, 12, generator=_gen(1))
    with torch.no_grad():
        ref = model(x)
        deployed = timm.utils.model.reparameterize_model(model)
        blocks = [m for m in deployed.modules() if isinstance(m, rs.Squeezable)]
        assert len(blocks) == 4 and all(b.deployed for b in blocks)
        assert not any(isinstance(m, rs.Squeezable) and m.deployed for m in model.modules())
        assert _relative(deployed(x), ref) <= 1e-5
    assert model[0].reparameterize() is None  # timm's convention: in place
    assert model[0].deployed


# --- rs.expand / rs.contract on timm and torchvision models ------------------------------------
def _train_steps(model: nn.Module, x: torch.Tensor, steps: int = 2) -> None:
    """A few SGD steps in training mode: weights and running statistics move."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    model.eval()


def _mobilenetv3() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10)
    return randomize_bn(model, _gen()).eval()


def test_expand_timm_mobilenetv3():
    """timm's BatchNormAct2d: its BatchNorm goes into the block, its activation stays."""
    model = _mobilenetv3()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(convs) == 53 and len(norms) == 34
    x = torch.randn(2, 3, 32, 32, generator=_gen(1))
    expanded, report = rs.expand(model, block="mobileone", return_report=True)
    assert len(report.expanded) == len(norms)  # every conv followed by a BatchNorm
    assert all("BatchNorm" in why for _, why in report.skipped)  # SE convs and the head
    assert _bns(expanded) == [n for n in _bns(expanded) if ".branches." in n]
    assert isinstance(expanded.bn1.act, nn.Hardswish)  # the activation stayed in place
    with torch.no_grad():
        assert _relative(expanded.eval()(x), model(x)) <= 1e-5


@pytest.mark.slow
def test_contract_timm_mobilenetv3():
    model = _mobilenetv3()
    x = torch.randn(2, 3, 32, 32, generator=_gen(1))
    expanded = rs.expand(model, block="mobileone")
    _train_steps(expanded, x)
    with torch.no_grad():
        trained = expanded(x)
        contracted = rs.contract(expanded)
        assert _relative(contracted(x), trained) <= 1e-5
    assert [type(m) for m in contracted.modules()] == [type(m) for m in model.modules()]
    fresh = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=10)
    fresh.load_state_dict(contracted.state_dict(), strict=True)
    with torch.no_grad():
        assert _relative(fresh.eval()(x), trained) <= 1e-5


def test_contract_restores_timm_norm_act_modules():
    from timm.layers import ConvNormAct

    model = nn.Sequential(
        ConvNormAct(3, 8, 3, act_layer=nn.PReLU), ConvNormAct(8, 8, 3, stride=2, groups=2)
    )
    randomize_bn(model, _gen()).eval()
    x = torch.randn(4, 3, 9, 9, generator=_gen(1))
    expanded = rs.expand(model, block="dbb")
    assert isinstance(expanded[0].conv, rs.DiverseBranchBlock)
    assert isinstance(expanded[0].bn.act, nn.PReLU)  # trainable activation kept in place
    _train_steps(expanded, x)
    with torch.no_grad():
        trained = expanded(x)
        contracted = rs.contract(expanded)
    assert [type(m) for m in contracted.modules()] == [type(m) for m in model.modules()]
    assert torch.equal(contracted[0].bn.act.weight, expanded[0].bn.act.weight)  # trained
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(contracted.state_dict(), strict=True)
    with torch.no_grad():
        assert _relative(fresh.eval()(x), trained) <= 1e-5


def test_expand_torchvision_conv2d_norm_activation():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10)
    randomize_bn(model, _gen()).eval()
    units = [m for m in model.modules() if isinstance(m, torchvision.ops.Conv2dNormActivation)]
    norms = _bns(model)
    x = torch.randn(2, 3, 32, 32, generator=_gen(1))
    expanded, report = rs.expand(model, block="acb", return_report=True)
    assert len(report.expanded) == len(norms) == 52 and len(units) == 35
    assert report.skipped == []
    assert all(
        isinstance(u[0], rs.ACBlock) for u in expanded.modules() if type(u) is type(units[0])
    )
    with torch.no_grad():
        assert _relative(expanded.eval()(x), model(x)) <= 1e-5


def test_contract_loads_strictly_into_torchvision_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    randomize_bn(model, _gen()).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen(1))
    expanded = rs.expand(model, block="repvgg")
    _train_steps(expanded, x)
    with torch.no_grad():
        trained = expanded(x)
        contracted = rs.contract(expanded)
    assert not any(isinstance(m, rs.Squeezable) for m in contracted.modules())
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(contracted.state_dict(), strict=True)
    with torch.no_grad():
        assert _relative(plain.eval()(x), trained) <= 1e-5
    assert isinstance(expanded.conv1, rs.RepVGGBlock)  # a copy by default


@pytest.mark.parametrize("kind", ["dbb", "mobileone"])
def test_contract_loads_strictly_into_timm_mobilenetv3(kind):
    """A timm CNN with norm + act modules (BatchNormAct2d), depthwise convs and SE."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    randomize_bn(model, _gen()).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen(1))
    expanded, report = rs.expand(model, block=kind, return_report=True)
    assert len(report.expanded) > 20
    _train_steps(expanded, x)
    with torch.no_grad():
        trained = expanded(x)
        contracted = rs.contract(expanded)
    stock = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    stock.load_state_dict(contracted.state_dict(), strict=True)
    with torch.no_grad():
        assert _relative(stock.eval()(x), trained) <= 1e-5


def test_contract_of_a_deployed_block_and_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU())
    randomize(model, _gen()).eval()
    x = torch.randn(2, 3, 7, 7, generator=_gen(1))
    expanded = rs.expand(model, block="mobileone")
    rs.deploy(expanded, inplace=True)
    with torch.no_grad():
        back = rs.contract(expanded)
        assert (
            type(back[0]) is nn.Conv2d
            and back[0].bias is not None
            and type(back[1]) is nn.BatchNorm2d
        )
        assert _relative(back(x), model(x)) <= 1e-5
    del expanded[1]
    with pytest.raises(ValueError, match="in place of its BatchNorm"):
        rs.contract(expanded)


# --- rs.from_timm ----------------------------------------------------------------------------
def _timm_block(kind: str, c_in: int, c_out: int, stride: int, **kw) -> nn.Module:
    from timm.models.byobnet import MobileOneBlock, RepVggBlock

    cls = RepVggBlock if kind == "repvgg" else MobileOneBlock
    return cls(c_in, c_out, stride=stride, **kw)


@pytest.mark.parametrize(
    ("kind", "c_in", "c_out", "stride", "kw"),
    [
        ("repvgg", 6, 6, 1, {}),
        ("repvgg", 4, 6, 2, {"group_size": 2}),
        ("mobileone", 6, 6, 1, {"num_conv_branches": 3}),
        ("mobileone", 6, 6, 2, {"group_size": 1}),  # depthwise, stride 2
        ("mobileone", 4, 6, 1, {"kernel_size": 1, "num_conv_branches": 2}),  # no scale branch
    ],
)
def test_from_timm_block_keeps_function(kind, c_in, c_out, stride, kw):
    src = randomize(_timm_block(kind, c_in, c_out, stride, **kw), _gen())
    x = torch.randn(4, c_in, 9, 9, generator=_gen(1))
    ours = rs.from_timm(src)
    assert isinstance(ours.block, rs.RepVGGBlock if kind == "repvgg" else rs.MobileOneBlock)
    n_src = sum(p.numel() for p in src.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_src  # one to one
    with torch.no_grad():
        assert _relative(ours.eval()(x), src.eval()(x)) <= 1e-5
    # training mode too (batch statistics), and the running statistics move alike
    y_src, y_ours = src.train()(x), ours.train()(x)
    assert _relative(y_ours, y_src) <= 1e-5
    theirs = [m.running_mean for m in src.modules() if isinstance(m, _BatchNorm)]
    mine = [m.running_mean for m in ours.modules() if isinstance(m, _BatchNorm)]
    assert sorted(float(t.sum()) for t in theirs) == pytest.approx(
        sorted(float(t.sum()) for t in mine), rel=1e-5
    )
    for kind_new in ("dbb", "acb", "expand_cl"):
        if kind_new == "expand_cl" and src.groups != 1:
            with pytest.raises(ValueError, match="groups=1"):
                rs.from_timm(src, block=kind_new)
            continue
        other = rs.from_timm(src.eval(), block=kind_new, mode="online")
        assert other.block.mode == "online"
        with torch.no_grad():
            assert _relative(other.eval()(x), src(x)) <= 1e-5, kind_new


def test_from_timm_repvgg_a0_deploys_like_timm():
    model = timm.create_model("repvgg_a0", pretrained=False, num_classes=10)
    randomize_bn(model, _gen()).eval()
    x = torch.randn(2, 3, 32, 32, generator=_gen(1))
    ours = rs.from_timm(model).eval()
    blocks = [m for m in ours.modules() if isinstance(m, rs.RepVGGBlock)]
    assert len(blocks) == 22
    with torch.no_grad():
        ref = model(x)
        assert _relative(ours(x), ref) <= 1e-5
        assert (
            _relative(rs.deploy(ours)(x), timm.utils.model.reparameterize_model(model)(x)) <= 1e-5
        )


def test_from_timm_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="no RepVggBlock or MobileOneBlock"):
        rs.from_timm(torchvision.models.resnet18())
    with pytest.raises(ValueError, match="drop_path"):
        rs.from_timm(_timm_block("repvgg", 4, 4, 1, drop_path_rate=0.1))
    with pytest.raises(ValueError, match="mode"):
        rs.from_timm(_timm_block("repvgg", 4, 4, 1), mode="fast")
