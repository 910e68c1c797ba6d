"""``create_model(name, pretrained=...)``: weight files made here (random-init official-layout,
timm and torchvision networks saved to ``tmp_path``) load into the registered models with
the same function; other heads are re-initialised, other input channels adapted, mismatches
refused in one line.

Oracles: the re-created official networks (``official_nets.py``), timm's and torchvision's
own models.
"""

from pathlib import Path

import official_nets as official
import pytest
import torch
import torchvision
from helpers import randomize
from torch import nn

import repsqueeze as rs
from repsqueeze.models import RepVGG, unregister_model
from repsqueeze.models.mobileone import MobileOne, with_branches
from repsqueeze.models.repvgg import repvgg_widths

pytestmark = pytest.mark.usefixtures("single_thread")
TINY_DEPTHS = (1, 2, 2, 1)  # stages 1-4 of the tiny test networks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(c: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(2, c, size, size, dtype=torch.float64, generator=_gen(1))


def _save(net: nn.Module, path) -> nn.Module:
    """Randomizes ``net`` (convs and BatchNorm statistics), saves its state dict, returns it."""
    net = randomize(net, _gen()).double().eval()
    torch.save(net.state_dict(), path)
    return net


@pytest.fixture
def float64():
    """Models built in float64, so that weights carried through their function keep it."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def tiny_models():
    """Tiny RepVGG (groups, SE) and MobileOne (SE) registered for the test only."""

    def tiny_repvgg(**kw) -> RepVGG:
        return RepVGG((1, *TINY_DEPTHS), repvgg_widths(0.25, 0.125), **kw)

    def tiny_mobileone(block="mobileone", **kw) -> MobileOne:
        block = with_branches(block, 2)
        return MobileOne((0.25, 0.25, 0.25, 0.125), block=block, depths=TINY_DEPTHS, **kw)

    rs.register_model(tiny_repvgg)
    rs.register_model(tiny_mobileone)
    yield tiny_repvgg
    unregister_model("tiny_repvgg")
    unregister_model("tiny_mobileone")


def _official_tiny(**kw) -> official.RepVGG:
    return official.RepVGG(TINY_DEPTHS, (0.25, 0.25, 0.25, 0.125), **kw)


# --- official layouts --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("variant", "kw"),
    [("plain", {}), ("g4 + SE", {"groups": 4, "use_se": True}), ("QARepVGG", {"qa": True})],
)
def test_official_repvgg_layouts_load_with_the_same_function(tiny_models, tmp_path, variant, kw):
    src = _save(_official_tiny(**kw), tmp_path / "official.pt")
    ours_kw = {k: v for k, v in kw.items() if k != "qa"} | (
        {"block": "qarepvgg"} if "qa" in kw else {}
    )
    model = rs.create_model(
        "tiny_repvgg", num_classes=10, pretrained=tmp_path / "official.pt", **ours_kw
    )
    report = model.pretrained_report
    assert report.layout == f"official {'qarepvgg' if 'qa' in kw else 'repvgg'}"
    assert report.converted == [] and report.reinitialised == []
    assert len(report.loaded) == len(model.state_dict())
    x = _x()
    with torch.no_grad():
        ref = src(x)
        model = model.double().eval()
        assert _rel(model(x), ref) <= 1e-10, variant
        assert _rel(rs.deploy(model)(x), ref) <= 1e-10, variant


def test_official_file_into_another_kind_deployed_and_another_head(tiny_models, tmp_path, float64):
    src = _save(_official_tiny(use_se=True), tmp_path / "official.pt")
    x = _x()
    with torch.no_grad():
        ref = src(x)
        for kw in ({"block": "dbb"}, {"block": "expand_cl", "expansion": 2}, {"deployed": True}):
            model = rs.create_model(
                "tiny_repvgg",
                num_classes=10,
                use_se=True,
                pretrained=tmp_path / "official.pt",
                **kw,
            )
            assert len(model.pretrained_report.converted) == 7  # stem + 6 blocks
            assert _rel(model.double().eval()(x), ref) <= 1e-10, kw
        other = rs.create_model(
            "tiny_repvgg", num_classes=3, use_se=True, pretrained=tmp_path / "official.pt"
        )
    assert other.pretrained_report.reinitialised == ["head.weight", "head.bias"]
    assert other.head.weight.shape == (3, 64)
    loaded = dict(other.named_parameters())
    assert torch.equal(loaded["stem.0.1.reduce.weight"].double(), src.stage0.se.down.weight)


def test_official_deployed_file_loads_into_training_form(tiny_models, tmp_path, float64):
    src = _save(_official_tiny(deploy=True), tmp_path / "deployed.pt")
    model = rs.create_model(
        "tiny_repvgg", num_classes=10, block="acb", pretrained=tmp_path / "deployed.pt"
    )
    assert model.pretrained_report.kind == "deployed"
    x = _x()
    with torch.no_grad():
        assert _rel(model.double().eval()(x), src(x)) <= 1e-10
    flat = rs.create_model(
        "tiny_repvgg", num_classes=10, deployed=True, pretrained=tmp_path / "deployed.pt"
    )
    assert flat.pretrained_report.converted == []  # same layout: loaded as it is


def test_official_mobileone_with_se_loads(tiny_models, tmp_path):
    src = _save(
        official.MobileOne((0.25, 0.25, 0.25, 0.125), TINY_DEPTHS, 2, (0, 0, 1, 1)),
        tmp_path / "m.pt",
    )
    model = rs.create_model(
        "tiny_mobileone", num_classes=10, se_blocks=(0, 0, 1, 1), pretrained=tmp_path / "m.pt"
    )
    assert model.pretrained_report.layout == "official mobileone"
    x = _x()
    with torch.no_grad():
        model = model.double().eval()
        assert _rel(model(x), src(x)) <= 1e-10
        assert _rel(rs.deploy(model)(x), src(x)) <= 1e-10


@pytest.mark.parametrize(
    "kind", ["dbb", *(pytest.param(k, marks=pytest.mark.slow) for k in ("acb", "plain"))]
)
def test_dbb_repo_resnet18_loads(tmp_path, kind, float64):  # DBB: the 1x1 + identity in float64
    src = _save(official.ResNet18(kind), tmp_path / "r18.pt")
    model = rs.create_model("resnet18", num_classes=10, block=kind, pretrained=tmp_path / "r18.pt")
    assert model.pretrained_report.layout == f"official {kind} resnet"
    assert model.pretrained_report.converted == []
    x = _x()
    with torch.no_grad():
        assert _rel(model.double().eval()(x), src(x)) <= 1e-10


# --- timm and torchvision ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "carried"), [("plain", 0), pytest.param("repvgg", 16, marks=pytest.mark.slow)]
)
def test_torchvision_resnet18_into_any_kind(tmp_path, float64, kind, carried):
    src = _save(torchvision.models.resnet18(num_classes=10), tmp_path / "tv.pt")
    x = _x()
    model = rs.create_model("resnet18", block=kind, num_classes=10, pretrained=tmp_path / "tv.pt")
    assert model.pretrained_report.layout == "torchvision resnet"
    assert len(model.pretrained_report.converted) == carried  # the 3x3 convs (stem, 1x1: plain)
    with torch.no_grad():
        assert _rel(model.double().eval()(x), src(x)) <= 1e-10


@pytest.fixture
def timm_file(tmp_path):
    timm = pytest.importorskip("timm")

    def make(arch: str, **kw):
        net = _save(timm.create_model(arch, pretrained=False, **kw), tmp_path / f"{arch}.pt")
        return net, tmp_path / f"{arch}.pt"

    return make


@pytest.mark.parametrize(
    ("arch", "ours"), [("repvgg_a0", {"cifar_stem": False}), ("mobileone_s0", {})]
)
def test_timm_files_load_by_path_and_by_tag(timm_file, arch, ours):
    src, path = timm_file(arch)
    x = _x()
    with torch.no_grad():
        ref = src(x)
        model = rs.create_model(arch, pretrained=path, **ours)
        assert model.pretrained_report.layout == "timm byobnet"
        assert _rel(model.double().eval()(x), ref) <= 1e-10
        tag = "rvgg_in1k" if arch.startswith("repvgg") else "apple_in1k"
        by_tag = rs.create_model(
            arch,
            num_classes=10,
            pretrained=f"timm:{arch}.{tag}",
            pretrained_cfg_overlay={"file": str(path)},
        )
    assert by_tag.pretrained_report.source == f"timm:{arch}.{tag}"
    assert by_tag.pretrained_report.reinitialised == ["head.weight", "head.bias"]


def test_in_channels_adapts_the_stem_like_timm(timm_file):
    from timm.models import adapt_input_conv

    src, path = timm_file("repvgg_a0")
    model = rs.create_model("repvgg_a0", in_channels=1, num_classes=7, pretrained=path)
    assert model.pretrained_report.adapted == [
        "stem.0.0.branches.0.0.weight",
        "stem.0.0.branches.1.0.weight",
    ]
    expected = adapt_input_conv(1, src.stem.conv_kxk.conv.weight.float())
    assert torch.equal(model.stem[0][0].branches[0][0].weight, expected)


def test_no_network_is_one_line_naming_the_tag(timm_file, monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files,\nand no cache"
        )

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(OSError) as info:
        rs.create_model("repvgg_a0", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert (
        "timm:repvgg_a0.rvgg_in1k" in message and "pretrained_cfg_overlay={'file': PATH}" in message
    )


# --- repsqueeze's own files, errors --------------------------------------------------------------
def test_own_files_any_kind_or_deployed(tmp_path, float64):
    trained = randomize(rs.create_model("digits_net", block="dbb"), _gen()).double().eval()
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()}},
        tmp_path / "a.ckpt",
    )
    rs.save_deployed(rs.deploy(trained), tmp_path / "deployed.pt", {"name": "digits_net"})
    x = _x(1, 8)
    with torch.no_grad():
        ref = trained(x)
        same = rs.create_model("digits_net", block="dbb", pretrained=tmp_path / "a.ckpt")
        assert same.pretrained_report.kind == "dbb" and same.pretrained_report.converted == []
        assert _rel(same.double().eval()(x), ref) <= 1e-10
        other = rs.create_model("digits_net", block="mobileone", pretrained=tmp_path / "a.ckpt")
        assert other.pretrained_report.kind == "dbb" and len(other.pretrained_report.converted) == 4
        assert _rel(other.double().eval()(x), ref) <= 1e-10
        back = rs.create_model("digits_net", block="repvgg", pretrained=tmp_path / "deployed.pt")
        assert back.pretrained_report.kind == "deployed"
        assert _rel(back.double().eval()(x), ref) <= 1e-10


def test_mismatch_and_bad_sources_are_one_line(tiny_models, tmp_path):
    _save(_official_tiny(), tmp_path / "official.pt")
    with pytest.raises(ValueError) as info:
        rs.create_model("tiny_repvgg", use_se=True, pretrained=tmp_path / "official.pt")
    message = str(info.value)
    assert "\n" not in message and "tiny_repvgg: pretrained=" in message
    assert "missing stem.0.1.reduce.weight" in message
    _save(_official_tiny(groups=2), tmp_path / "g2.pt")
    with pytest.raises(
        ValueError, match=r"is \[\d+, \d+, 3, 3\] in the file, \[\d+, \d+, 3, 3\] in the model"
    ):
        rs.create_model("tiny_repvgg", pretrained=tmp_path / "g2.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        rs.create_model("digits_net", pretrained=tmp_path / "none.pt")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="key layout is not one repsqueeze knows"):
        rs.create_model("digits_net", pretrained=tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="pretrained must be"):
        rs.create_model("digits_net", pretrained=3)


# --- fine-tuning helpers -------------------------------------------------------------------------
def test_freeze_keeps_frozen_norms_in_eval_and_groups_scale_the_head():
    model = rs.create_model("digits_net", block="repvgg")
    frozen = rs.models.freeze(model, ["stem", "stages.0"])
    assert frozen and all(n.startswith(("stem.", "stages.0.")) for n in frozen)
    model.train()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(m.training == n.startswith("stages.1") for n, m in norms.items())
    groups = rs.models.parameter_groups(model, {"head": {"lr_scale": 10.0}}, lr=0.1)
    assert groups[0]["param_names"] == ["head.weight", "head.bias"] and groups[0]["lr"] == 1.0
    assert not set(frozen) & {n for g in groups for n in g["param_names"]}
    torch.optim.SGD(groups, lr=0.1)  # the groups are what torch takes
    with torch.no_grad():
        deployed = rs.deploy(model.eval())
        x = torch.randn(2, 1, 8, 8)
        assert _rel(deployed(x), model(x)) <= 1e-5
    rs.models.unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(m) is nn.BatchNorm2d for m in norms.values())
    with pytest.raises(ValueError, match="'body' matches no parameter .* stem, stages, head"):
        rs.models.freeze(model, "body")


# --- published architectures: official layout, big variants -------------------------------------
def _unit_by_unit(model: nn.Module, src: nn.Module, x: torch.Tensor) -> None:
    """Each of our units against the official block it came from, on the official network's
    own activations (deep random networks amplify float64 rounding from layer to layer, so
    the end-to-end logits of a 48-layer one say less than each layer does)."""
    ours = [model.stem, *(u for s in model.stages for u in s)]
    theirs = [src.stage0, *(b for i in range(1, 5) for b in getattr(src, f"stage{i}"))]
    assert len(ours) == len(theirs)
    with torch.no_grad():
        for i, (u, b) in enumerate(zip(ours, theirs, strict=True)):
            assert _rel(u(x), b(x)) <= 1e-10, i
            x = b(x)
        assert _rel(model.forward_head(x), src.linear(x.mean((2, 3)))) <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "depths", "width", "kw"),
    [
        ("repvgg_b1g2", (4, 6, 16, 1), (2, 2, 2, 4), {"groups": 2}),
        ("repvgg_b1g4", (4, 6, 16, 1), (2, 2, 2, 4), {"groups": 4}),
        ("repvgg_d2se", (8, 14, 24, 1), (2.5, 2.5, 2.5, 5), {"use_se": True}),
    ],
)
def test_published_repvgg_variants_load_official_layout(tmp_path, name, depths, width, kw):
    src = _save(official.RepVGG(depths, width, num_classes=1000, **kw), tmp_path / "o.pt")
    model = rs.create_model(name, pretrained=tmp_path / "o.pt").double().eval()
    _unit_by_unit(model, src, _x())


@pytest.mark.slow
def test_mobileone_s4_loads_official_layout(tmp_path):
    src = _save(
        official.MobileOne((3.0, 3.5, 3.5, 4.0), se=(0, 0, 5, 1), num_classes=1000),
        tmp_path / "s4.pt",
    )
    model = rs.create_model("mobileone_s4", pretrained=tmp_path / "s4.pt").double().eval()
    _unit_by_unit(model, src, _x())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["repvgg_d2se", "mobileone_s4", "resnet50"])
def test_timm_published_architectures_load(timm_file, arch):
    src, path = timm_file(arch)
    model = rs.create_model(arch, pretrained=path).double().eval()
    x = _x()
    with torch.no_grad():  # timm's forward_features / forward_head match ours
        assert _rel(model.forward_features(x), src.forward_features(x)) <= 1e-8
        assert (
            _rel(
                model.forward_head(src.forward_features(x)),
                src.forward_head(src.forward_features(x)),
            )
            <= 1e-10
        )


# --- the config key ------------------------------------------------------------------------------
def test_config_key_model_net_pretrained_reaches_create_model(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    trained = randomize(rs.create_model("digits_net", block="acb"), _gen())
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    GlobalHydra.instance().clear()
    configs = Path(__file__).parents[2] / "configs"
    initialize_config_dir(config_dir=str(configs), version_base="1.3")
    try:
        fixed = [
            "model.net.num_classes=10",
            "model.net.in_channels=1",
            f"paths.root_dir={tmp_path}",
        ]
        assert compose("train", overrides=fixed).model.net.pretrained is False
        cfg = compose("train", overrides=[*fixed, f"model.net.pretrained={tmp_path / 'w.pt'}"])
        module = instantiate(cfg.model)
        assert "pretrained" not in module.hparams.net_config  # the checkpoint holds the weights
        x = torch.randn(2, 1, 8, 8)
        with torch.no_grad():
            assert _rel(module.net.eval()(x), trained.eval()(x)) <= 1e-5
        missing = compose("train", overrides=[*fixed, f"model.net.pretrained={tmp_path / 'no.pt'}"])
        with pytest.raises(InstantiationException) as info:
            instantiate(missing.model)
        assert isinstance(info.value.__cause__, FileNotFoundError)
        assert "\n" not in str(info.value.__cause__)
    finally:
        GlobalHydra.instance().clear()
