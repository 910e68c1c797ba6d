"""Tests for the block registry: a user's block registered by name is built by
``create_block`` and by ``create_model`` and deploys exactly; factories bind arguments; an
unknown kind gets the same one-line error from every entry point."""

import inspect

import pytest
import torch
from helpers import assert_equivalent, randomize
from torch import nn

import repsqueeze as rs
from repsqueeze.zoo import (
    BLOCKS,
    BlockArgs,
    ZooBlock,
    block_factory,
    create_block,
    list_blocks,
    register_block,
    unregister_block,
)

RTOL = 1e-10
BUILT_IN = ["plain", "repvgg", "acb", "dbb", "mobileone", "expand_ck", "expand_cl", "qarepvgg"]
UNKNOWN = f"unknown block kind 'nope'; valid kinds: {', '.join(BUILT_IN)}"

pytestmark = pytest.mark.usefixtures("single_thread")


class KxKPlusChain(ZooBlock, rs.Parallel):
    """A user's block: a k x k conv-BN plus a 1x1 -> k x k chain of conv-BNs, summed."""

    def parts(self, args: BlockArgs, *, wide: bool = False) -> list[nn.Module]:
        c_in, c_out, k = args.in_channels, args.out_channels, args.kernel_size
        hidden = 2 * c_out if wide else c_out
        chain = nn.Sequential(
            *args.conv_norm(c_in, hidden, 1),
            *args.conv_norm(hidden, c_out, k, args.stride, k // 2),
        )
        return [args.main(), chain]


@pytest.fixture
def user_kind():
    register_block("kxk_chain")(KxKPlusChain)
    yield "kxk_chain"
    unregister_block("kxk_chain")


def test_built_in_kinds_are_registered_in_order():
    assert list_blocks() == list(BLOCKS) == BUILT_IN
    with pytest.raises(TypeError):
        BLOCKS["mine"] = BLOCKS["plain"]  # a read-only view of the registry


def test_a_registered_block_is_built_by_create_model_and_deploys_exactly(user_kind, generator):
    assert user_kind in list_blocks()
    model = rs.create_model("digits_net", block=user_kind, wide=True, num_classes=3)
    blocks = [m for m in model.modules() if isinstance(m, KxKPlusChain)]
    assert len(blocks) == 4 and all(b.branches[1][0].out_channels == 128 for b in blocks[2:])
    model = randomize(model.double(), generator).eval()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=generator)
    deployed = rs.deploy(model)
    assert all(type(b.conv) is nn.Conv2d for b in deployed.modules() if isinstance(b, ZooBlock))
    assert_equivalent(deployed(x), model(x), RTOL)
    fresh = rs.create_model("digits_net", num_classes=3, deployed=True).double()
    fresh.load_state_dict(deployed.state_dict(), strict=True)  # one conv per block, any kind
    assert_equivalent(fresh(x), model(x), RTOL)


def test_a_registered_block_reports_its_own_arguments(user_kind):
    with pytest.raises(TypeError) as info:
        rs.create_model("digits_net", block=user_kind, colour="red")
    message = str(info.value)
    assert message.startswith("digits_net got an unexpected keyword argument 'colour'; ")
    assert "the arguments of a 'kxk_chain' block: groups, mode, online_norm, wide, " in message
    with pytest.raises(ValueError, match="a block kind named 'kxk_chain' is already registered"):
        register_block(user_kind, KxKPlusChain)


def test_register_block_as_a_call_binds_defaults():
    register_block("dbb_wide", rs.DiverseBranchBlock, internal_channels=8)
    try:
        block = create_block("dbb_wide", 4, 6, stride=2)
        assert block.branches[2][0].out_channels == 8 and block.branches[0][0].stride == (2, 2)
        assert create_block("dbb_wide", 4, 6, internal_channels=5).branches[2][0].out_channels == 5
    finally:
        unregister_block("dbb_wide")
    assert "dbb_wide" not in list_blocks()


def test_a_factory_binds_arguments_and_models_take_it(generator):
    factory = block_factory("dbb", internal_channels=4, mode="online")
    assert factory.kind == "dbb" and dict(factory.defaults) == {
        "internal_channels": 4,
        "mode": "online",
    }
    model = rs.create_model("resnet20_cifar", block=factory, num_classes=5)
    dbbs = [m for m in model.modules() if isinstance(m, rs.DiverseBranchBlock)]
    assert dbbs and all(b.branches[2][0].out_channels == 4 and b.mode == "online" for b in dbbs)
    shortcuts = [m.shortcut for m in model.modules() if isinstance(m, rs.models.BasicBlock)]
    plain = [s for s in shortcuts if isinstance(s, rs.ConvBN)]
    assert plain and all(s.mode == "online" for s in plain)  # the factory's mode, plain kind
    refused = r"^a 'dbb' block got an unexpected keyword argument 'use_1x1'; it takes groups, "
    with pytest.raises(TypeError, match=refused):
        block_factory("dbb", use_1x1=False)


def test_a_plain_constructor_is_a_block_too(generator):
    def conv_bn(in_channels, out_channels, kernel_size=3, stride=1, **kwargs):
        return rs.make_block("plain", in_channels, out_channels, kernel_size, stride, **kwargs)

    model = rs.create_model("digits_net", block=conv_bn)
    assert sum(isinstance(m, rs.ConvBN) for m in model.modules()) == 4


@pytest.mark.parametrize(
    "build",
    [
        lambda: rs.make_block("nope", 3, 3),
        lambda: create_block("nope", 3, 3),
        lambda: block_factory("nope"),
        lambda: rs.create_model("digits_net", block="nope"),
        lambda: rs.create_model("resnet20_cifar", block="nope", pretrained=False),
        lambda: rs.models.RepVGG((1, 1), (4, 4), block="nope"),
        lambda: unregister_block("nope"),
    ],
    ids=[
        "make_block",
        "create_block",
        "block_factory",
        "create_model",
        "resnet",
        "RepVGG",
        "unset",
    ],
)
def test_an_unknown_kind_has_one_error(build):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == UNKNOWN


def test_every_block_has_the_shared_constructor():
    params = inspect.signature(rs.RepVGGBlock).parameters
    assert list(params)[:6] == ["in_channels", "out_channels", "kernel_size", "stride"] + [
        "use_identity",
        "use_1x1",
    ]
    assert rs.MobileOneBlock(4, 6, 3, 2).branches[0][0].stride == (2, 2)
    assert rs.MobileOneBlock(4, 6, 3, stride=2).branches[0][0].stride == (2, 2)
    with pytest.raises(
        TypeError, match=r"^RepVGGBlock got an unexpected keyword argument 'colour'$"
    ):
        rs.RepVGGBlock(4, 4, colour="red")
    with pytest.raises(
        ValueError, match=r"^DiverseBranchBlock is built with dilation=1 only, got 2$"
    ):
        rs.DiverseBranchBlock(4, 4, dilation=2)
    with pytest.raises(ValueError, match=r"^dims must be 1, 2 or 3 spatial dims, got 4$"):
        rs.ConvBN(4, 4, dims=4)
