"""Tests for repsqueeze.models: every model with every block kind deploys exactly, to one
architecture per model, and a model built with ``deployed=True`` loads that state dict.
"""

import functools

import pytest
import torch
from helpers import assert_equivalent, randomize_bn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs
from repsqueeze.models import (
    CifarResNet,
    RepVGG,
    create_model,
    list_models,
    register_model,
    unregister_model,
)
from repsqueeze.models.repvgg import DEPTHS_A, DEPTHS_B, repvgg_widths
from repsqueeze.zoo import ConvBN, list_blocks

KINDS = list_blocks()
RTOL = 1e-10  # float64: max|squeezed - block| <= RTOL * max(1, max|block|)
NUM_CLASSES = 7
# name -> (constructor kwargs, input shape (C, H, W)); the big ones are slow.
MODELS = {
    "digits_net": ({}, (1, 8, 8)),
    "resnet20_cifar": ({}, (3, 32, 32)),
    "resnet56_cifar": ({}, (3, 32, 32)),
    "repvgg_a0": ({"cifar_stem": True}, (3, 32, 32)),
    "repvgg_a1": ({"cifar_stem": True}, (3, 32, 32)),
    "repvgg_b0": ({"cifar_stem": True}, (3, 32, 32)),
    **{
        f"repvgg_{v}": ({"cifar_stem": True}, (3, 32, 32))
        for v in ("a2", "b1", "b1g2", "b1g4", "b2", "b2g2", "b2g4", "b3", "b3g2", "b3g4", "d2se")
    },
    **{f"mobileone_s{i}": ({}, (3, 32, 32)) for i in range(5)},
    "resnet18": ({}, (3, 32, 32)),
    "resnet50": ({}, (3, 32, 32)),
}
FAST = {"digits_net", "resnet20_cifar", "resnet56_cifar"}

pytestmark = pytest.mark.usefixtures("single_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layout(model: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(n, p.shape) for n, p in model.state_dict().items()]


def check_deploys_exactly(
    build, input_shape: tuple[int, ...], kind: str, generator: torch.Generator
) -> list:
    """Training form == deployed form == a ``deployed=True`` model loaded from its state dict.

    Returns the layout of the deployed model, to compare across block kinds.
    """
    model = randomize_bn(build(block=kind).double().eval(), generator)
    x = torch.randn(2, *input_shape, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, NUM_CLASSES)
        deployed = rs.deploy(model)
        assert_equivalent(deployed(x), y, RTOL)
        assert not any(isinstance(m, _BatchNorm) for m in deployed.modules())

        built = build(block=kind, deployed=True)
        assert layout(deployed) == layout(built)
        assert n_params(built) == n_params(deployed)
        built.double().load_state_dict(deployed.state_dict(), strict=True)
        assert_equivalent(built(x), y, RTOL)
    return layout(deployed)


@functools.cache
def plain_layout(name: str) -> list:
    """Layout of the deployed model with the plain conv-BN block: every kind must match it."""
    return layout(create_model(name, num_classes=NUM_CLASSES, deployed=True, **MODELS[name][0]))


MODEL_KINDS = [
    pytest.param(name, kind, marks=() if name in FAST else pytest.mark.slow, id=f"{name}-{kind}")
    for name in list_models()
    for kind in KINDS
]


@pytest.mark.parametrize(("name", "kind"), MODEL_KINDS)
def test_registered_model_deploys_exactly(name, kind, generator):
    kwargs, input_shape = MODELS[name]

    def build(**kw):
        return create_model(name, num_classes=NUM_CLASSES, **kwargs, **kw)

    assert check_deploys_exactly(build, input_shape, kind, generator) == plain_layout(name)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_repvgg_deploys_exactly(kind, generator):
    def build(**kw):
        return RepVGG(
            (1, 2, 1, 1, 1), (8, 8, 8, 16, 16), num_classes=NUM_CLASSES, cifar_stem=True, **kw
        )

    assert check_deploys_exactly(build, (3, 32, 32), kind, generator) == layout(
        build(block="plain", deployed=True)
    )


def test_every_registered_model_is_tested():
    assert set(list_models()) == set(MODELS)


# --- architectures ---------------------------------------------------------------------------


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("repvgg_a0", 8.30),
        pytest.param("repvgg_a1", 12.78, marks=pytest.mark.slow),
        pytest.param("repvgg_b0", 14.33, marks=pytest.mark.slow),
    ],
)
def test_repvgg_parameter_counts_match_the_paper(name, millions):
    model = create_model(name, deployed=True)
    assert n_params(model) == pytest.approx(millions * 1e6, abs=0.01e6)


@pytest.mark.parametrize(
    ("name", "depths", "widths"),
    [
        ("repvgg_a0", DEPTHS_A, repvgg_widths(0.75, 2.5)),
        pytest.param("repvgg_b0", DEPTHS_B, repvgg_widths(1, 2.5), marks=pytest.mark.slow),
    ],
)
def test_repvgg_stages(name, depths, widths):
    model = create_model(name, deployed=True)
    stages = [model.stem, *model.stages]
    assert [len(s) for s in stages] == list(depths)
    assert [[unit[0].conv.stride[0] for unit in s] for s in stages] == [
        [2] + [1] * (d - 1) for d in depths
    ]
    assert [s[0][0].conv.out_channels for s in stages] == list(widths)
    assert all(isinstance(unit[1], nn.ReLU) for s in stages for unit in s)


@pytest.mark.parametrize(("cifar_stem", "stride"), [(False, 2), (True, 1)])
def test_repvgg_cifar_stem(cifar_stem, stride):
    model = RepVGG((1, 1, 1, 1, 1), (4, 4, 4, 4, 4), cifar_stem=cifar_stem, deployed=True)
    assert model.stem[0][0].conv.stride == (stride, stride)
    assert model.stages(model.stem(torch.randn(1, 3, 64, 64))).shape[-1] == 64 // 16 // stride


def test_repvgg_widths():
    assert repvgg_widths(0.75, 2.5) == (48, 48, 96, 192, 1280)
    assert repvgg_widths(1, 2.5) == (64, 64, 128, 256, 1280)
    assert repvgg_widths(2, 4) == (64, 128, 256, 512, 2048)


@pytest.mark.slow
def test_repvgg_a0_at_imagenet_resolution(generator):
    model = create_model("repvgg_a0", block="acb", num_classes=10).double().eval()
    model = randomize_bn(model, generator)
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        assert model.stages(model.stem(x)).shape == (1, 1280, 7, 7)
        assert_equivalent(rs.deploy(model)(x), model(x), RTOL)


def test_cifar_resnet_structure():
    model = create_model("resnet20_cifar", deployed=True)
    assert [len(s) for s in model.stages] == [3, 3, 3]
    shortcuts = [unit.shortcut for s in model.stages for unit in s]
    assert [type(s) for s in shortcuts] == [nn.Identity] * 3 + [
        ConvBN,
        nn.Identity,
        nn.Identity,
    ] * 2
    assert [s.conv.kernel_size for s in shortcuts if isinstance(s, ConvBN)] == [(1, 1)] * 2
    assert len(convs(model)) == 19 + 2
    assert len(convs(create_model("resnet56_cifar", deployed=True))) == 55 + 2
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)


def test_digits_net_size():
    model = create_model("digits_net", deployed=True)
    assert 50_000 <= n_params(model) <= 100_000
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_block_kwargs_are_forwarded():
    model = create_model("digits_net", block="mobileone", num_conv_branches=3, use_scale=False)
    assert all(
        len(unit[0].branches) in (3, 4) for unit in [model.stem, *model.stages[0], *model.stages[1]]
    )
    norm = create_model(
        "resnet20_cifar", block="expand_cl", expansion=2, norm_layer=nn.SyncBatchNorm
    )
    assert all(type(m) is nn.SyncBatchNorm for m in norm.modules() if isinstance(m, _BatchNorm))
    assert norm.stem[0].layers[0].out_channels == 6


def test_unknown_block_kind_is_refused():
    with pytest.raises(ValueError, match="valid kinds"):
        create_model("digits_net", block="resnet")


# --- registry --------------------------------------------------------------------------------


def test_registry_lists_and_creates():
    assert list_models() == sorted(MODELS)
    assert isinstance(create_model("resnet20_cifar"), CifarResNet)
    with pytest.raises(ValueError, match="available: digits_net, mobileone_s0"):
        create_model("vgg16")


def test_registry_refuses_duplicates():
    def my_net(**kwargs):
        return nn.Identity()

    assert register_model(my_net) is my_net
    try:
        assert "my_net" in list_models()
        assert isinstance(create_model("my_net"), nn.Identity)
        with pytest.raises(ValueError, match="already registered"):
            register_model(my_net)
    finally:
        assert unregister_model("my_net") is my_net
    assert "my_net" not in list_models()


def test_list_models_filters_by_pattern():
    assert list_models("repvgg_[ab]0") == ["repvgg_a0", "repvgg_b0"]
    assert len(list_models("repvgg*")) == 14 and len(list_models("mobileone_s?")) == 5
    assert list_models("*_cifar") == ["resnet20_cifar", "resnet56_cifar"]
    assert list_models("resnet[25]?_cifar") == ["resnet20_cifar", "resnet56_cifar"]
    assert list_models("vgg*") == []
    assert list_models() == list_models("*") == sorted(MODELS)


@pytest.mark.parametrize(
    ("name", "kwargs", "takes"),
    [
        ("digits_net", {}, "it takes block, num_classes, in_channels, deployed, act_layer, and the arguments of a 'repvgg' block: groups, mode, online_norm"),
        ("repvgg_a0", {"block": "dbb"}, "cifar_stem, deployed, act_layer, groups, use_se, and the arguments of a 'dbb' block: "),
        ("resnet20_cifar", {"block": "mobileone"}, "and the arguments of a 'mobileone' block: "),
    ],
)  # fmt: skip
def test_unknown_keyword_argument_names_the_model(name, kwargs, takes):
    with pytest.raises(TypeError) as info:
        create_model(name, colour="red", **kwargs)
    message = str(info.value)
    assert message.startswith(f"{name} got an unexpected keyword argument 'colour'; ")
    assert takes in message
    assert "__init__" not in message
    assert "kernel_size" not in message.split("block: ")[1]  # set by the model, not by users


def test_block_argument_is_accepted_and_a_real_type_error_is_kept():
    model = create_model("digits_net", block="dbb", internal_channels=4)
    assert isinstance(model, nn.Module)
    with pytest.raises(TypeError, match="multiple values"):
        create_model("digits_net", stride=2)  # not an unknown name: Python's own error


def test_pretrained_true_without_published_weights_says_what_to_pass():
    pytest.importorskip("timm")
    assert isinstance(create_model("digits_net", pretrained=False), nn.Module)
    with pytest.raises(ValueError, match="digits_net: no published weights .* pretrained=PATH"):
        create_model("digits_net", pretrained=True)
