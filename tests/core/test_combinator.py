"""A combinator written by a user from the public extension points alone (``combine``,
``parts_name``, the ``Squeezable`` constructor) squeezes, runs online and deploys exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_equivalent, randomize
from torch import nn

import repsqueeze as rs

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64


class Shortcut(rs.Squeezable):
    """``x + body(x)``: an identity path beside a body."""

    combine = "sum"
    parts_name = "paths"

    def __init__(self, body: nn.Module, deployed: bool = False, mode: str = "chain") -> None:
        super().__init__(nn.Identity(), body, deployed=deployed, mode=mode)


class Halves(rs.Squeezable):
    """Two bodies, each on its half of the input channels, outputs concatenated."""

    combine = "split"
    parts_name = "halves"

    def __init__(self, left: nn.Module, right: nn.Module, channels: int) -> None:
        super().__init__(left, right, split=(channels // 2, channels - channels // 2))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _body() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4))


def test_user_combinator_equals_its_definition_and_squeezes_exactly():
    block = randomize(Shortcut(_body()).double(), _gen(0)).eval()
    x = torch.randn(2, 4, 7, 6, dtype=F64, generator=_gen(1))
    body = block.paths[1]
    with torch.no_grad():
        assert_equivalent(block(x), x + body(x), 1e-10)  # the naive definition, an oracle
        assert_equivalent(block.squeeze()(x), block(x), 1e-10)
        online = copy.deepcopy(block).set_mode("online")
        assert_equivalent(online(x), block(x), 1e-10)
    assert block.squeeze().kernel_size == (3, 3)


def test_user_combinator_nests_deploys_and_loads_strictly():
    torch.manual_seed(0)
    model = rs.SqueezableBlock(nn.Conv2d(3, 4, 1), Shortcut(_body()), nn.BatchNorm2d(4))
    model = randomize(model.double(), _gen(2)).eval()
    x = torch.randn(2, 3, 6, 6, dtype=F64, generator=_gen(3))
    with torch.no_grad():
        expected = model(x)
        deployed = rs.deploy(model)
        assert_equivalent(deployed(x), expected, 1e-10)
    alone = randomize(Shortcut(_body()).double(), _gen(4)).eval()
    fresh = Shortcut(_body(), deployed=True).double().eval()
    fresh.load_state_dict(rs.deploy(alone).state_dict(), strict=True)
    y = torch.randn(2, 4, 6, 6, dtype=F64, generator=_gen(5))
    with torch.no_grad():
        assert_equivalent(fresh(y), alone(y), 1e-10)


def test_user_split_combinator_squeezes_into_a_grouped_conv():
    block = Halves(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1), 4)
    block = randomize(block.double(), _gen(5)).eval()
    x = torch.randn(2, 4, 5, 5, dtype=F64, generator=_gen(6))
    conv = block.squeeze()
    assert conv.groups == 2
    with torch.no_grad():
        naive = torch.cat([block.halves[0](x[:, :2]), block.halves[1](x[:, 2:])], dim=1)
        assert_equivalent(block(x), naive, 1e-10)
        assert_equivalent(conv(x), naive, 1e-10)


def test_unknown_combine_kind_is_refused_with_the_kinds():
    class Product(rs.Squeezable):
        combine = "product"

    with pytest.raises(ValueError, match=r"Product: combine must be one of \('chain', 'sum'"):
        Product(nn.Conv2d(2, 2, 1))
