"""Interop with timm and torchvision, and the official training-form state dicts.

Oracles: timm's own blocks (their forward in eval and training mode), torchvision's and
timm's original models, and, for the official state dicts, reference forwards written here
from the papers' definitions with ``F.conv2d`` / ``F.batch_norm`` on the official keys.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
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
        rs.RepVGGBlock(3, 8), nn.ReLU(), rs.DiverseBranchBlock(8, 8, stride=2), nn.ReLU(),
        rs.make_block("expand_cl", 8, 4), nn.Sequential(rs.ACBlock(4, 4), nn.ReLU()),
    )  # fmt: skip
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


# --- official state dicts: key layouts written out by hand, forwards from the papers ---------
def _conv_w(sd: dict, key: str, shape: tuple, g: torch.Generator) -> None:
    sd[key] = torch.randn(shape, generator=g, dtype=torch.float64) / shape[1] ** 0.5


def _bn_w(sd: dict, prefix: str, c: int, g: torch.Generator) -> None:
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(c, generator=g, dtype=torch.float64)  # noqa: E731
    sd[prefix + "weight"], sd[prefix + "bias"] = u(0.5, 2), u(-1, 1)
    sd[prefix + "running_mean"], sd[prefix + "running_var"] = u(-1, 1), u(0.5, 2)
    sd[prefix + "num_batches_tracked"] = torch.tensor(0)


def _bn(y: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(
        y, sd[prefix + "running_mean"], sd[prefix + "running_var"], sd[prefix + "weight"],
        sd[prefix + "bias"], False, 0.0, 1e-5,
    )  # fmt: skip


def _bn_and_pad(y: torch.Tensor, sd: dict, prefix: str, p: int) -> torch.Tensor:
    """DBB's BNAndPadLayer: BN, then a border of width p filled with what BN gives for 0."""
    out = F.pad(_bn(y, sd, prefix), [p] * 4)
    std = (sd[prefix + "running_var"] + 1e-5).sqrt()
    value = sd[prefix + "bias"] - sd[prefix + "running_mean"] * sd[prefix + "weight"] / std
    value = value.view(1, -1, 1, 1).expand(out.shape[0], -1, out.shape[2], out.shape[3])
    inner = torch.zeros_like(out, dtype=torch.bool)
    inner[..., p : out.shape[2] - p, p : out.shape[3] - p] = True
    return torch.where(inner, out, value)


def _official_repvgg(c_in, c_out, s, g, gen, prefix=""):
    sd = {}
    _conv_w(sd, prefix + "rbr_dense.conv.weight", (c_out, c_in // g, 3, 3), gen)
    _bn_w(sd, prefix + "rbr_dense.bn.", c_out, gen)
    _conv_w(sd, prefix + "rbr_1x1.conv.weight", (c_out, c_in // g, 1, 1), gen)
    _bn_w(sd, prefix + "rbr_1x1.bn.", c_out, gen)
    if c_in == c_out and s == 1:
        _bn_w(sd, prefix + "rbr_identity.", c_out, gen)

    def forward(x):
        y = _bn(
            F.conv2d(x, sd[prefix + "rbr_dense.conv.weight"], None, s, 1, 1, g),
            sd,
            prefix + "rbr_dense.bn.",
        )
        y = y + _bn(
            F.conv2d(x, sd[prefix + "rbr_1x1.conv.weight"], None, s, 0, 1, g),
            sd,
            prefix + "rbr_1x1.bn.",
        )
        return y + _bn(x, sd, prefix + "rbr_identity.") if c_in == c_out and s == 1 else y

    return sd, forward, rs.RepVGGBlock(c_in, c_out, stride=s, groups=g)


def _official_mobileone(c_in, c_out, s, g, gen, n=3, k=3):
    sd = {}
    for i in range(n):
        _conv_w(sd, f"rbr_conv.{i}.conv.weight", (c_out, c_in // g, k, k), gen)
        _bn_w(sd, f"rbr_conv.{i}.bn.", c_out, gen)
    if k > 1:
        _conv_w(sd, "rbr_scale.conv.weight", (c_out, c_in // g, 1, 1), gen)
        _bn_w(sd, "rbr_scale.bn.", c_out, gen)
    skip = c_in == c_out and s == 1
    if skip:
        _bn_w(sd, "rbr_skip.", c_out, gen)

    def forward(x):
        y = sum(
            _bn(
                F.conv2d(x, sd[f"rbr_conv.{i}.conv.weight"], None, s, k // 2, 1, g),
                sd,
                f"rbr_conv.{i}.bn.",
            )
            for i in range(n)
        )
        if k > 1:
            y = y + _bn(
                F.conv2d(x, sd["rbr_scale.conv.weight"], None, s, 0, 1, g), sd, "rbr_scale.bn."
            )
        return y + _bn(x, sd, "rbr_skip.") if skip else y

    return sd, forward, rs.MobileOneBlock(c_in, c_out, k, s, groups=g, num_conv_branches=n)


def _official_acnet(c_in, c_out, s, g, gen):
    sd = {}
    for name, kernel in (("square", (3, 3)), ("ver", (3, 1)), ("hor", (1, 3))):
        _conv_w(sd, f"{name}_conv.weight", (c_out, c_in // g, *kernel), gen)
        _bn_w(sd, f"{name}_bn.", c_out, gen)

    def forward(x):
        pads = {"square": (1, 1), "ver": (1, 0), "hor": (0, 1)}
        return sum(
            _bn(F.conv2d(x, sd[f"{n}_conv.weight"], None, s, p, 1, g), sd, f"{n}_bn.")
            for n, p in pads.items()
        )

    return sd, forward, rs.ACBlock(c_in, c_out, stride=s, groups=g)


def _official_dbb(c_in, c_out, s, g, gen):
    """Non-depthwise: idconv1 (stored minus identity), dbb_1x1, a 1x1 in dbb_avg; depthwise:
    conv1 with 2 * c_in channels, no dbb_1x1, dbb_avg = avg pool + BN."""
    sd, dw = {}, g == c_out
    _conv_w(sd, "dbb_origin.conv.weight", (c_out, c_in // g, 3, 3), gen)
    _bn_w(sd, "dbb_origin.bn.", c_out, gen)
    if not dw:
        _conv_w(sd, "dbb_1x1.conv.weight", (c_out, c_in // g, 1, 1), gen)
        _bn_w(sd, "dbb_1x1.bn.", c_out, gen)
        _conv_w(sd, "dbb_avg.conv.weight", (c_out, c_in // g, 1, 1), gen)
        _bn_w(sd, "dbb_avg.bn.bn.", c_out, gen)
    mid = 2 * c_in if dw else c_in
    first = "conv1" if dw else "idconv1"
    _conv_w(sd, f"dbb_1x1_kxk.{first}.weight", (mid, c_in // g, 1, 1), gen)
    _bn_w(sd, "dbb_1x1_kxk.bn1.bn.", mid, gen)
    _conv_w(sd, "dbb_1x1_kxk.conv2.weight", (c_out, mid // g, 3, 3), gen)
    _bn_w(sd, "dbb_1x1_kxk.bn2.", c_out, gen)
    _bn_w(sd, "dbb_avg.avgbn.", c_out, gen)

    def forward(x):
        y = _bn(F.conv2d(x, sd["dbb_origin.conv.weight"], None, s, 1, 1, g), sd, "dbb_origin.bn.")
        w1 = sd[f"dbb_1x1_kxk.{first}.weight"]
        if not dw:  # IdentityBasedConv1x1: the kernel is weight + identity
            eye = torch.zeros_like(w1)
            for i in range(c_in):
                eye[i, i % (c_in // g), 0, 0] = 1
            w1 = w1 + eye
            y = y + _bn(F.conv2d(x, sd["dbb_1x1.conv.weight"], None, s, 0, 1, g), sd, "dbb_1x1.bn.")
            h = _bn_and_pad(
                F.conv2d(x, sd["dbb_avg.conv.weight"], None, 1, 0, 1, g), sd, "dbb_avg.bn.bn.", 1
            )
            y = y + _bn(F.avg_pool2d(h, 3, s, 0), sd, "dbb_avg.avgbn.")
        else:
            y = y + _bn(F.avg_pool2d(x, 3, s, 1), sd, "dbb_avg.avgbn.")
        h = _bn_and_pad(F.conv2d(x, w1, None, 1, 0, 1, g), sd, "dbb_1x1_kxk.bn1.bn.", 1)
        return y + _bn(
            F.conv2d(h, sd["dbb_1x1_kxk.conv2.weight"], None, s, 0, 1, g), sd, "dbb_1x1_kxk.bn2."
        )

    return sd, forward, rs.DiverseBranchBlock(c_in, c_out, stride=s, groups=g)


OFFICIAL = {
    "repvgg": _official_repvgg,
    "mobileone": _official_mobileone,
    "acb": _official_acnet,
    "dbb": _official_dbb,
}


@pytest.mark.parametrize(
    ("c_in", "c_out", "stride", "groups"), [(4, 4, 1, 1), (4, 6, 2, 2), (4, 4, 1, 4), (4, 4, 2, 2)]
)
@pytest.mark.parametrize("kind", list(OFFICIAL))
def test_official_state_dict_maps_one_to_one(kind, c_in, c_out, stride, groups):
    sd, reference, block = OFFICIAL[kind](c_in, c_out, stride, groups, _gen())
    block = block.double().eval()
    rs.load_official_state_dict(block, sd, kind=kind)
    assert sum(p.numel() for p in block.parameters()) == sum(
        v.numel() for k, v in sd.items() if k.endswith(("weight", "bias"))
    )
    x = torch.randn(2, c_in, 9, 8, dtype=torch.float64, generator=_gen(1))
    with torch.no_grad():
        ref = reference(x)
        assert _relative(block(x), ref) <= 1e-10
        assert _relative(block.squeeze()(x), ref) <= 1e-10


def test_official_deployed_keys_and_whole_models():
    gen = _gen()
    sd = {"stem.weight": torch.randn(4, 3, 3, 3, dtype=torch.float64)}
    first, f1, b1 = _official_repvgg(4, 4, 1, 1, gen, prefix="body.0.")
    second, f2, b2 = _official_repvgg(4, 6, 2, 1, gen, prefix="body.1.")
    sd |= first | second
    model = nn.ModuleDict(
        {"stem": nn.Conv2d(3, 4, 3, bias=False), "body": nn.Sequential(b1, b2)}
    ).double()
    rs.load_official_state_dict(model, sd)  # kind found from the keys
    assert torch.equal(model["stem"].weight, sd["stem.weight"])
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=_gen(1))
    with torch.no_grad():
        assert _relative(model["body"].eval()(x), f2(f1(x))) <= 1e-10
    deployed = {"rbr_reparam.weight": torch.randn(4, 4, 3, 3), "rbr_reparam.bias": torch.randn(4)}
    block = rs.RepVGGBlock(4, 4, deployed=True)
    rs.load_official_state_dict(block, deployed, kind="repvgg")
    assert torch.equal(block.conv.weight, deployed["rbr_reparam.weight"])


def test_official_state_dict_errors_name_the_keys():
    sd, _, _ = _official_repvgg(4, 4, 1, 1, _gen())
    with pytest.raises(ValueError, match="branches.2"):  # ours has no identity branch
        rs.load_official_state_dict(rs.RepVGGBlock(4, 4, use_identity=False), sd, kind="repvgg")
    with pytest.raises(ValueError, match="no official dbb block"):
        rs.convert_official_state_dict(sd, kind="dbb")
    with pytest.raises(ValueError, match="unknown official block kind"):
        rs.convert_official_state_dict(sd, kind="resnet")
    with pytest.raises(ValueError, match="rbr_dense.extra.weight: not a parameter"):
        rs.convert_official_state_dict({**sd, "rbr_dense.extra.weight": torch.zeros(1)})


# --- peer fidelity ---------------------------------------------------------------------------
def test_dbb_chain_1x1_starts_as_identity_like_dbb():
    block = rs.DiverseBranchBlock(4, 6, groups=2)
    w = block.branches[2][0].weight  # (4, 2, 1, 1), as DBB's IdentityBasedConv1x1
    eye = torch.zeros_like(w)
    for i in range(4):
        eye[i, i % 2, 0, 0] = 1
    assert torch.equal(w, eye)
    depthwise = rs.DiverseBranchBlock(4, 4, groups=4)  # 2x internal channels: ordinary init
    assert depthwise.branches[1][0].weight.abs().sum() > 0
    assert rs.DiverseBranchBlock(4, 6, internal_channels=8).branches[2][0].weight.shape[0] == 8


def test_mobileone_1x1_has_no_duplicate_scale_branch():
    assert len(rs.MobileOneBlock(4, 6, kernel_size=1, num_conv_branches=2).branches) == 2
    assert len(rs.MobileOneBlock(4, 6, kernel_size=3, num_conv_branches=2).branches) == 3
    assert len(rs.MobileOneBlock(4, 6, kernel_size=1, use_scale=True).branches) == 2
