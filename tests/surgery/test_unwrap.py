"""``rs.deploy(model, unwrap=True)``: a deployed model made of torch modules only, whose
``state_dict`` loads strictly into a hand-written plain network of the same shapes."""

import pytest
import torch
from helpers import randomize
from torch import nn

import repsqueeze as rs
from repsqueeze.zoo import BLOCKS


def _unit(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU(inplace=True))


class HandWrittenDigits(nn.Module):
    """digits_net deployed, written out by hand: 3x3 conv + ReLU units, mean pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _unit(1, 32, 1)
        self.stages = nn.Sequential(
            nn.Sequential(_unit(32, 32, 1)), nn.Sequential(_unit(32, 64, 2), _unit(64, 64, 1))
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))  # (N, 10)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_unwrapped_model_is_plain_torch_and_loads_into_hand_written(kind, generator):
    model = randomize(rs.create_model("digits_net", block=kind), generator).eval()
    x = torch.randn(3, 1, 12, 12, generator=generator)
    wrapped = rs.deploy(model)
    bare = rs.deploy(model, unwrap=True)
    foreign = [
        type(m).__qualname__
        for m in bare.modules()
        if not type(m).__module__.startswith("torch.nn")
    ]
    assert foreign == ["ConvClassifier"]  # only the model's own container class is left
    assert not any(isinstance(m, rs.Squeezable) for m in bare.modules())
    hand = HandWrittenDigits().eval()
    hand.load_state_dict(bare.state_dict(), strict=True)
    with torch.no_grad():
        expected = model(x)
        scale = expected.abs().max()
        for out in (bare(x), wrapped(x), hand(x)):
            assert (out - expected).abs().max() <= 1e-5 * scale
        torch.testing.assert_close(hand(x), bare(x), rtol=0, atol=0)
    assert any(isinstance(m, rs.Squeezable) for m in model.modules())  # not in place


def test_unwrap_of_a_block_returns_its_conv_and_inplace_mutates(generator):
    block = randomize(rs.make_block("dbb", 4, 6, 3, 1), generator).eval()
    x = torch.randn(2, 4, 7, 7, generator=generator)
    conv = rs.deploy(block, unwrap=True)
    assert type(conv) is nn.Conv2d
    with torch.no_grad():
        assert (conv(x) - block(x)).abs().max() <= 1e-5 * block(x).abs().max()
    model = nn.Sequential(block, nn.ReLU())
    assert rs.deploy(model, inplace=True, unwrap=True) is model
    assert type(model[0]) is nn.Conv2d
