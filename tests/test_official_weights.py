"""The official training-form and deployed state dicts of RepVGG, MobileOne, ACNet and DBB
load one to one into our blocks.

Oracles: reference forwards written here from the papers' definitions with ``F.conv2d`` /
``F.batch_norm`` on the official keys.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repsqueeze as rs

pytestmark = pytest.mark.usefixtures("single_thread")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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
        y,
        sd[prefix + "running_mean"],
        sd[prefix + "running_var"],
        sd[prefix + "weight"],
        sd[prefix + "bias"],
        False,
        0.0,
        1e-5,
    )


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
