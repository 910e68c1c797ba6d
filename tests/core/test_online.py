"""Online mode: the kernel composed inside the forward pass equals running the layers.

``mode="online"`` composes the exact kernel and bias of a block from its parameters in every
forward pass (autograd through the composition) and runs one convolution; trailing BatchNorms
of a chain run after it. These tests hold it to ``mode="chain"``: outputs, the gradient of
every parameter and BatchNorm running statistics, over hypothesis-drawn BN-free blocks and
over the block zoo (ExpandNets with its trailing BN, the OREPA-style ``online_norm`` variant);
then the errors, the ``"auto"`` cost model, the model-level switches and a short training run.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_equivalent,
    assert_matches_chain,
    assert_same_buffers,
    randomize,
    randomize_bn,
    with_mode,
)
from hypothesis import given
from strategies import Example, examples
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs
from repsqueeze.core.auto import choose_by_macs
from repsqueeze.training.lit import Classifier
from repsqueeze.zoo import make_block

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
]

F64 = torch.float64
BN_INSIDE = ("repvgg", "acb", "dbb", "mobileone")  # BatchNorm in every branch


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 1, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _top_blocks(model: nn.Module) -> list[rs.Squeezable]:
    """The blocks no other block contains (the ones ``rs.set_mode`` reaches)."""
    if isinstance(model, rs.Squeezable):
        return [model]
    return [b for child in model.children() for b in _top_blocks(child)]


# --- hypothesis: BN-free blocks (the shared strategies) ----------------------------------------
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (F64, 1e-10)])
@given(ex=examples(dims=(1, 2), bn=False))
def test_online_equals_chain_on_bn_free_blocks(ex: Example, dtype: torch.dtype, tol: float):
    block = copy.deepcopy(ex.block).to(dtype).train()
    assert_matches_chain(block, ex.input(dtype), tol)


@pytest.mark.parametrize("c_out", [2, 3])
def test_online_parallel_that_changes_channels(c_out):
    """A top-level Parallel mapping 2 to c_out channels (RepVGG 2 -> 3, say) runs online."""
    block = rs.Parallel(nn.Conv2d(2, c_out, 3, padding=1), nn.Conv2d(2, c_out, 1))
    block = randomize(block.double(), _gen(2)).train()
    assert_matches_chain(block, _randn(2, 2, 7, 7), 1e-10)


# --- the zoo: trailing BatchNorm (ExpandNets, ConvBN) runs after the composed conv ------------
@pytest.mark.parametrize(
    ("kind", "c_in", "c_out", "kernel_size", "stride", "groups", "dims", "padding_mode"),
    [
        ("expand_cl", 3, 5, 3, 1, 1, 2, "zeros"),
        ("expand_cl", 4, 6, 3, 2, 2, 2, "reflect"),
        ("expand_cl", 4, 4, 5, 1, 1, 1, "circular"),
        ("expand_ck", 3, 5, 3, 1, 1, 2, "zeros"),
        ("expand_ck", 4, 4, 5, 2, 2, 2, "replicate"),
        ("expand_ck", 2, 3, 1, 1, 1, 1, "zeros"),
        ("plain", 3, 4, 3, 2, 1, 2, "zeros"),
    ],
)
def test_trailing_bn_block_online_equals_chain_in_training(
    kind, c_in, c_out, kernel_size, stride, groups, dims, padding_mode
):
    block = make_block(
        kind, c_in, c_out, kernel_size, stride, groups, dims, padding_mode=padding_mode,
        **({"expansion": 2} if kind.startswith("expand") else {}),
    )  # fmt: skip
    block = randomize(block.double(), _gen(3)).train()
    x = _randn(4, c_in, *(9,) * dims)
    assert_matches_chain(block, x, 1e-10)

    chain, online = with_mode(block, "chain"), with_mode(block, "online")
    for model in (chain, online):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for seed in (11, 12):
            opt.zero_grad()
            model(_randn(*x.shape, seed=seed)).square().mean().backward()
            opt.step()
    assert_same_buffers(online, chain, 1e-10)
    assert chain.layers[-1].num_batches_tracked.item() == 2
    assert_equivalent(online(x), chain(x), 1e-10)
    for p, q in zip(online.parameters(), chain.parameters(), strict=True):
        assert_equivalent(p.detach(), q.detach(), 1e-10)


# --- the OREPA-style variant: channel scales inside, one BatchNorm after the block -----------
CONFIGS = [(4, 6, 1, 1), (4, 6, 2, 2), (4, 4, 1, 4)]  # (in, out, stride, groups)


@pytest.mark.parametrize("kind", BN_INSIDE)
@pytest.mark.parametrize(("c_in", "c_out", "stride", "groups"), CONFIGS)
def test_online_norm_online_equals_chain_and_deploys_exactly(kind, c_in, c_out, stride, groups):
    block = make_block(kind, c_in, c_out, stride=stride, groups=groups, online_norm=True)
    assert not any(isinstance(m, _BatchNorm) for m in block.layers[0].modules())
    assert isinstance(block.layers[-1], _BatchNorm)
    block = randomize(block.double(), _gen(5)).train()
    x = _randn(4, c_in, 9, 9)
    assert_matches_chain(block, x, 1e-10)

    block.set_mode("online")
    opt = torch.optim.SGD(block.parameters(), lr=0.05, momentum=0.9)
    for seed in range(3):
        opt.zero_grad()
        block(_randn(*x.shape, seed=20 + seed)).square().mean().backward()
        opt.step()
    randomize_bn(block, _gen(6)).eval()
    deployed = rs.deploy(block)
    with torch.no_grad():
        assert_equivalent(deployed(x), block(x), 1e-10)
        assert_equivalent(deployed(x), with_mode(block, "chain")(x), 1e-10)


def _conv_signature(conv: nn.Module) -> tuple:
    return (
        type(conv), conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
        conv.padding, conv.dilation, conv.groups, conv.padding_mode,
    )  # fmt: skip


@pytest.mark.parametrize("kind", BN_INSIDE)
@pytest.mark.parametrize(("c_in", "c_out", "stride", "groups"), CONFIGS)
def test_online_norm_deploys_to_the_same_architecture(kind, c_in, c_out, stride, groups):
    kw = {"stride": stride, "groups": groups}
    ours = rs.deploy(make_block(kind, c_in, c_out, online_norm=True, **kw))
    theirs = rs.deploy(make_block(kind, c_in, c_out, **kw))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert _conv_signature(ours.conv) == _conv_signature(theirs.conv)
    built = make_block(kind, c_in, c_out, deployed=True, online_norm=True, **kw)
    assert _conv_signature(built.conv) == _conv_signature(ours.conv)


@pytest.mark.parametrize("kind", BN_INSIDE)
def test_online_norm_model_deployed_state_dict_loads_strict(kind):
    torch.manual_seed(0)
    model = rs.create_model("digits_net", block=kind, online_norm=True)
    randomize(model.double(), _gen(8)).eval()
    state = rs.deploy(model).state_dict()
    rebuilt = rs.create_model("digits_net", block=kind, online_norm=True, deployed=True)
    rebuilt.double().load_state_dict(state, strict=True)
    plain = rs.create_model("digits_net", block=kind, deployed=True)
    assert {k: v.shape for k, v in state.items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    x = _randn(2, 1, 8, 8)
    with torch.no_grad():
        assert_equivalent(rebuilt.eval()(x), model(x), 1e-10)


# --- BatchNorm inside the composed part ------------------------------------------------------
def _bn_paths(block: nn.Module) -> list[str]:
    return [name for name, m in block.named_modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize("kind", BN_INSIDE)
def test_online_with_bn_inside_in_training_raises_naming_the_layer(kind):
    block = make_block(kind, 4, 4, mode="online").train()
    with pytest.raises(ValueError, match="online_norm") as err:
        block(_randn(2, 4, 8, 8, dtype=torch.float32))
    message = str(err.value)
    assert any(f"{path} (BatchNorm2d)" in message for path in _bn_paths(block)), message


def test_online_bn_error_names_the_nested_path():
    block = rs.SqueezableBlock(
        nn.Conv2d(3, 4, 1), nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)),
        nn.Conv2d(4, 2, 1), mode="online",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"layers\.1\.1 \(BatchNorm2d\).*online_norm"):
        block(_randn(2, 3, 6, 6, dtype=torch.float32))


@pytest.mark.parametrize("kind", [*BN_INSIDE, "expand_cl", "plain"])
@pytest.mark.parametrize(("c_out", "stride"), [(4, 1), (6, 2)])
def test_online_with_bn_inside_works_in_eval_mode(kind, c_out, stride):
    """BN folded with its running statistics (randomized), gradients through the fold."""
    block = make_block(kind, 4, c_out, stride=stride)
    block = randomize(block.double(), _gen(9)).eval()
    assert_matches_chain(block, _randn(3, 4, 9, 9), 1e-10)


# --- mode="auto": the multiply-accumulate model (auto's choice under torch.compile) -----------------------------------
def test_macs_of_a_two_conv_chain_are_the_per_layer_sums():
    block = rs.SqueezableBlock(nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 4, 3, padding=1))
    h, w, batch = 10, 12, 2
    costs = block.macs((3, h, w), batch=batch)
    assert costs["chain"] == batch * h * w * (5 * 3 * 9 + 4 * 5 * 9)
    conv = h * w * 4 * 3 * 25  # one 5x5 conv per sample
    compose = 4 * 5 * 3 * 9 * 9  # (4, 5, 3x3) composed with (5, 3, 3x3), once per forward
    assert costs["online"] == batch * conv + compose


def test_macs_spatial_estimate_is_input_over_stride():
    block = rs.SqueezableBlock(nn.Conv2d(3, 5, 3, 2, 1), nn.Conv2d(5, 4, 1))
    costs = block.macs((3, 10, 12))
    assert costs["chain"] == 5 * 6 * (5 * 3 * 9 + 4 * 5)


def test_auto_picks_online_for_an_expanded_block_on_a_large_input():
    block = make_block("expand_cl", 16, 16, expansion=4, mode="auto").train()
    x = torch.empty(64, 16, 32, 32)  # only the shape matters to the choice
    costs = block.macs(tuple(x.shape[1:]), batch=64)
    assert costs["online"] < costs["chain"] / 10
    assert choose_by_macs(block, tuple(x.shape), 2) == "online"


def test_auto_picks_chain_when_composing_costs_more():
    """Two wide depthwise convs on a tiny input: the dense composition (C^3 k^4) dominates."""
    c = 128
    block = rs.SqueezableBlock(
        nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 3, padding=1, groups=c),
        mode="auto",
    )  # fmt: skip
    x = torch.randn(1, c, 4, 4)
    costs = block.macs(tuple(x.shape[1:]))
    assert costs["online"] > 100 * costs["chain"]
    assert choose_by_macs(block, tuple(x.shape), 2) == "chain"
    with torch.no_grad():
        assert_equivalent(block(x), with_mode(block, "chain")(x), 1e-6)


def test_auto_cost_of_a_parallel_does_not_depend_on_nesting():
    """Summing branches multiplies nothing: a top-level Parallel must cost what the same
    Parallel costs inside a chain (the composition cost treats its branches as a chain)."""

    def branches() -> rs.Parallel:
        torch.manual_seed(0)
        return rs.Parallel(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 1))

    top, nested = branches().set_mode("auto"), rs.SqueezableBlock(branches(), mode="auto")
    x = torch.empty(1, 64, 8, 8)
    assert top.macs((64, 8, 8)) == nested.macs((64, 8, 8))
    assert (
        choose_by_macs(nested, tuple(x.shape), 2) == "online"
    )  # 64*64*8*8*9 MACs vs 64*64*8*8*(9 + 1)
    assert choose_by_macs(top, tuple(x.shape), 2) == "online"


@pytest.mark.parametrize("kind", list(rs.BLOCKS))
def test_auto_never_raises_in_training_and_equals_chain(kind):
    block = randomize(make_block(kind, 8, 8, mode="auto").double(), _gen(10)).train()
    x = _randn(16, 8, 16, 16)
    costs = block.macs(tuple(x.shape[1:]), batch=x.shape[0])
    picked = choose_by_macs(block, tuple(x.shape), 2)
    if kind in BN_INSIDE:
        assert costs["online"] < costs["chain"]  # online would be cheaper, but BN blocks it
        assert picked == "chain"
    if kind.startswith("expand"):
        assert picked == "online"  # trailing BN only: online is allowed
    assert_matches_chain(block, x, 1e-10, mode="auto")


@pytest.mark.parametrize("bn_state", ["no running stats", "bn left in training"])
def test_auto_in_eval_never_folds_a_bn_with_batch_statistics(bn_state):
    """auto must fall back to chain whenever a BN *uses* batch statistics, whatever the
    block's own training flag (the block's flag is what it checks today)."""
    bn = nn.BatchNorm2d(16, track_running_stats=bn_state != "no running stats")
    block = rs.SqueezableBlock(
        nn.Conv2d(4, 16, 1), bn, nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1),
        mode="auto",
    )  # fmt: skip
    block.eval()
    if bn_state == "bn left in training":
        bn.train()
    x = torch.randn(64, 4, 32, 32)
    costs = block.macs(tuple(x.shape[1:]), batch=64)
    assert costs["online"] < costs["chain"]  # online would be picked, were the BN foldable
    y = block(x)  # raises ValueError today: auto picks online and the live fold refuses the BN
    with torch.no_grad():
        assert_equivalent(y, with_mode(block, "chain")(x), 1e-5)


# --- model-level switches ----------------------------------------------------------------------
def test_set_mode_reaches_every_block_of_a_model():
    model = rs.create_model("resnet20_cifar", block="expand_cl", expansion=2)
    blocks = _top_blocks(model)
    assert len(blocks) == 19 + 2  # 19 expanded 3x3 blocks, 2 ConvBN shortcuts
    assert rs.set_mode(model, "online") is model
    assert all(b.mode == "online" for b in blocks)
    nested = [m for b in blocks for m in b.modules() if isinstance(m, rs.Squeezable)]
    assert len(nested) == len(blocks)  # nothing nested: set_mode touched them all
    with pytest.raises(ValueError, match="mode must be one of"):
        rs.set_mode(model, "fast")
    assert all(b.mode == "online" for b in blocks)

    model = randomize(model.double(), _gen(12)).train()
    assert_matches_chain(model, _randn(2, 3, 16, 16), 1e-10)


def test_lightning_classifier_sets_mode_on_its_net():
    module = Classifier(
        net={"name": "digits_net", "block": "expand_cl"}, num_classes=10, mode="online"
    )
    blocks = _top_blocks(module.net)
    assert blocks and all(b.mode == "online" for b in blocks)
    assert module.hparams.mode == "online"
    default = Classifier(net={"name": "digits_net", "block": "expand_cl"}, num_classes=10)
    assert all(b.mode == "chain" for b in _top_blocks(default.net))


# --- training ----------------------------------------------------------------------------------
def test_training_online_follows_the_same_trajectory_as_chain():
    torch.manual_seed(0)
    chain = rs.create_model("digits_net", block="expand_cl", expansion=2).double().train()
    online = with_mode(chain, "online")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (chain, online)]
    gen = _gen(13)
    for _ in range(20):
        x = torch.randn(8, 1, 8, 8, generator=gen, dtype=F64)
        y = torch.randint(0, 10, (8,), generator=gen)
        for model, opt in zip((chain, online), opts, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for p, q in zip(online.parameters(), chain.parameters(), strict=True):
        assert_equivalent(p.detach(), q.detach(), 1e-8)
    assert_same_buffers(online, chain, 1e-8)


def test_online_sees_children_replaced_after_first_forward():
    """The online plan caches no modules: convert_sync_batchnorm after a forward is honoured."""
    torch.manual_seed(0)
    block = rs.SqueezableBlock(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), mode="online"
    ).eval()
    x = torch.randn(2, 3, 6, 6)
    block(x)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(block).eval()
    assert isinstance(converted.layers[1], nn.SyncBatchNorm)
    converted.layers[1].running_mean.fill_(5.0)
    expected = converted.layers[1](converted.layers[0](x))
    torch.testing.assert_close(converted(x), expected)
