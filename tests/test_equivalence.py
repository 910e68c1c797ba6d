"""Property-based equivalence: a block in training form == its squeezed convolution.

Hypothesis draws blocks over the whole accepted space: chains of 1-4 layers (convs with
rectangular and even kernels, stride, dilation, groups, bias, every kind of padding; BN
before and after convs; Identity; AvgPool; nested ``nn.Sequential``, ``SqueezableBlock`` and
``Parallel`` with aligned branches), in 1-D, 2-D and 3-D, with every padding mode. BatchNorm
statistics are randomized, inputs have odd sizes, and the check is a tolerance on the max
error (1e-10 in float64, 1e-5 in float32, relative to the output scale).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from helpers import (
    BN_CLASS,
    CONV_CLASS,
    CONVS,
    POOL_CLASS,
    assert_equivalent,
    expected_pad,
    expected_stride,
    naive,
    randomize,
)
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
]

MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass
class Ctx:
    """What every layer of one drawn block shares."""

    draw: Callable
    ndim: int
    mode: str  # padding mode of every layer that pads
    max_c: int
    max_k: int
    max_len: int  # layers in the top-level chain
    max_depth: int  # nesting levels


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _ones(ctx: Ctx) -> tuple[int, ...]:
    return (1,) * ctx.ndim


def _centred(ctx: Ctx) -> tuple[int, ...]:
    return (-1,) * ctx.ndim


def _channels(ctx: Ctx, c_in: int) -> int:
    return ctx.draw(st.sampled_from([c_in, *range(1, ctx.max_c + 1)]))


def _stride(ctx: Ctx) -> tuple[int, ...]:
    return tuple(ctx.draw(st.sampled_from([1, 1, 2])) for _ in range(ctx.ndim))


# --- single layers ---------------------------------------------------------------------------
def draw_conv(
    ctx: Ctx,
    c_in: int,
    c_out: int | None = None,
    stride: tuple[int, ...] | None = None,
    slack: tuple[int, ...] | None = None,
) -> nn.Module:
    """A conv; with ``slack`` its padding makes ``pad_l + pad_r - window == slack``."""
    draw, nd = ctx.draw, ctx.ndim
    c_out = _channels(ctx, c_in) if c_out is None else c_out
    depthwise = c_in == c_out and c_in > 1 and draw(st.booleans())
    groups = c_in if depthwise else draw(st.sampled_from(_divisors(math.gcd(c_in, c_out))))
    stride = _stride(ctx) if stride is None else stride
    unit = all(s == 1 for s in stride)
    if slack is None:
        kernel = tuple(draw(st.integers(1, ctx.max_k)) for _ in range(nd))
        dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        kind = draw(st.sampled_from(["int", "tuple", "valid", *(["same"] if unit else [])]))
        padding = {
            "int": lambda: draw(st.integers(0, 2)),
            "tuple": lambda: tuple(draw(st.integers(0, 2)) for _ in range(nd)),
            "valid": lambda: "valid",
            "same": lambda: "same",
        }[kind]()
    elif unit and all(s == -1 for s in slack) and draw(st.booleans()):
        kernel = tuple(draw(st.integers(1, ctx.max_k)) for _ in range(nd))
        dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        padding = "same"
    else:
        kernel, dilation, padding = [], [], []
        for s in slack:
            p = draw(st.integers(0, 1))
            window = 2 * p - s
            d = draw(st.sampled_from([1, 2])) if window > 1 and (window - 1) % 2 == 0 else 1
            kernel.append((window - 1) // d + 1)
            dilation.append(d)
            padding.append(p)
        padding = tuple(padding) if draw(st.booleans()) or len(set(padding)) > 1 else padding[0]
    if padding == "same":
        pads = any(d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
    else:
        pads = padding != "valid" and any(padding if isinstance(padding, tuple) else [padding])
    mode = ctx.mode if pads else draw(st.sampled_from(MODES))  # non-padding: any mode
    kw = {"dilation": tuple(dilation), "groups": groups, "padding_mode": mode}
    return CONV_CLASS[nd](
        c_in, c_out, tuple(kernel), stride, padding, bias=draw(st.booleans()), **kw
    )


def draw_bn(ctx: Ctx, c: int) -> nn.Module:
    draw = ctx.draw
    affine = draw(st.booleans())
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    if draw(st.integers(0, 4)) == 0:
        return nn.SyncBatchNorm(c, eps=eps, affine=affine)
    return BN_CLASS[ctx.ndim](c, eps=eps, affine=affine)


def draw_pool(
    ctx: Ctx, stride: tuple[int, ...] | None = None, slack: tuple[int, ...] | None = None
) -> nn.Module:
    draw, nd = ctx.draw, ctx.ndim
    can_pad = ctx.mode == "zeros"
    if slack is None:
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        padding = tuple(draw(st.integers(0, k // 2)) if can_pad else 0 for k in kernel)
    else:
        padding = tuple(draw(st.integers(0, 1)) if can_pad else 0 for _ in slack)
        kernel = tuple(2 * p - s for p, s in zip(padding, slack, strict=True))
    if stride is None:
        stride = draw(st.one_of(st.none(), st.just(_stride(ctx))))
    count_include_pad = True if any(padding) else draw(st.booleans())
    kw = {"count_include_pad": count_include_pad}
    if nd > 1 and draw(st.integers(0, 3)) == 0:
        kw["divisor_override"] = draw(st.integers(1, 4))
    return POOL_CLASS[nd](kernel, stride, padding, **kw)


# --- chains and parallels --------------------------------------------------------------------
def draw_chain(ctx: Ctx, c_in: int, depth: int) -> tuple[list[nn.Module], int]:
    """1..max_len layers with free geometry; returns the layers and the output channels."""
    draw = ctx.draw
    kinds = ["conv", "conv", "conv", "bn", "bn", "identity", "pool"]
    if depth < ctx.max_depth:
        kinds += ["seq", "block", "parallel"]
    layers, c = [], c_in
    for _ in range(draw(st.integers(1, ctx.max_len if depth == 0 else 2))):
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            layers.append(draw_conv(ctx, c))
            c = layers[-1].out_channels
        elif kind == "bn":
            layers.append(draw_bn(ctx, c))
        elif kind == "identity":
            layers.append(nn.Identity())
        elif kind == "pool":
            layers.append(draw_pool(ctx))
        elif kind in ("seq", "block"):
            inner, c = draw_chain(ctx, c, depth + 1)
            layers.append(nn.Sequential(*inner) if kind == "seq" else rs.SqueezableBlock(*inner))
        else:
            c_out = _channels(ctx, c)
            layers.append(draw_parallel(ctx, c, c_out, depth + 1))
            c = c_out
    return layers, c


def draw_parallel(
    ctx: Ctx,
    c_in: int,
    c_out: int,
    depth: int,
    stride: tuple[int, ...] | None = None,
    slack: tuple[int, ...] | None = None,
    first_conv: bool = False,
) -> rs.Parallel:
    """2-3 branches sharing stride and slack (the first one a conv when ``first_conv``)."""
    draw = ctx.draw
    stride = _stride(ctx) if stride is None else stride
    if slack is None:
        slack = tuple(draw(st.sampled_from([-1, -1, -2, -3])) for _ in range(ctx.ndim))
    branches = []
    for i in range(draw(st.integers(2, 3))):
        if i == 0 and first_conv:
            branches.append(draw_conv(ctx, c_in, c_out, stride, slack))
        else:
            branches.append(draw_branch(ctx, c_in, c_out, stride, slack, depth))
    return rs.Parallel(*branches)


def _keeps(c_in: int, c_out: int, stride, slack) -> bool:
    """Whether an identity-like layer (BN, Identity) fits a branch."""
    return c_in == c_out and all(s == 1 for s in stride) and all(s == -1 for s in slack)


def draw_branch(ctx: Ctx, c_in: int, c_out: int, stride, slack, depth: int) -> nn.Module:
    draw = ctx.draw
    kinds = ["conv", "conv", "seq", "block"]
    if _keeps(c_in, c_out, stride, slack):
        kinds += ["bn", "identity"]
    if c_in == c_out:
        kinds.append("pool")
    if depth < ctx.max_depth:
        kinds.append("parallel")
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        return draw_conv(ctx, c_in, c_out, stride, slack)
    if kind == "bn":
        return draw_bn(ctx, c_in)
    if kind == "identity":
        return nn.Identity()
    if kind == "pool":
        return draw_pool(ctx, stride, slack)
    if kind == "parallel":
        return draw_parallel(ctx, c_in, c_out, depth + 1, stride, slack)
    layers = draw_aligned_chain(ctx, c_in, c_out, stride, slack, depth + 1)
    return nn.Sequential(*layers) if kind == "seq" else rs.SqueezableBlock(*layers)


def draw_aligned_chain(ctx: Ctx, c_in: int, c_out: int, stride, slack, depth: int):
    """A chain whose composite has ``stride`` and ``slack``: one anchor layer carries both,
    the others are centred (slack -1) with stride 1, so they change neither."""
    draw = ctx.draw
    n = draw(st.integers(1, 3))
    kinds = ["conv", "conv", "bn", "identity", "pool"]
    if depth < ctx.max_depth:
        kinds.append("parallel")
    kinds = [draw(st.sampled_from(kinds)) for _ in range(n)]
    anchor = draw(st.integers(0, n - 1))
    if kinds[anchor] in ("bn", "identity") and not _keeps(1, 1, stride, slack):
        kinds[anchor] = "conv"
    if c_in != c_out and not {"conv", "parallel"} & set(kinds):
        kinds[-1] = "conv"
    last_mixer = max((i for i, k in enumerate(kinds) if k in ("conv", "parallel")), default=-1)
    layers, c = [], c_in
    for i, kind in enumerate(kinds):
        s, sl = (stride, slack) if i == anchor else (_ones(ctx), _centred(ctx))
        out = c_out if i == last_mixer else _channels(ctx, c)
        if kind == "conv":
            layers.append(draw_conv(ctx, c, out, s, sl))
            c = out
        elif kind == "parallel":
            layers.append(draw_parallel(ctx, c, out, depth + 1, s, sl, first_conv=True))
            c = out
        elif kind == "bn":
            layers.append(draw_bn(ctx, c))
        elif kind == "identity":
            layers.append(nn.Identity())
        else:
            layers.append(draw_pool(ctx, s, sl))
    return layers


# --- whole examples --------------------------------------------------------------------------
@dataclass
class Example:
    block: rs.Squeezable
    ndim: int
    c_in: int
    sizes: tuple[int, ...]
    seed: int

    def input(self, batch: int = 2) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(batch, self.c_in, *self.sizes, generator=g, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Example(ndim={self.ndim}, sizes={self.sizes}, seed={self.seed},\n{self.block})"


def _feasible(block: nn.Module, ndim: int, c_in: int, sizes, mode: str) -> bool:
    """Input sizes for which the naive chain runs and the block's one border fits the mode."""
    total = expected_pad(block, ndim)
    if mode == "reflect" and any(max(p) >= n for p, n in zip(total, sizes, strict=True)):
        return False
    if mode == "circular" and any(max(p) > n for p, n in zip(total, sizes, strict=True)):
        return False
    try:
        with torch.no_grad():
            naive(block, torch.zeros(1, c_in, *sizes, dtype=torch.float64))
    except RuntimeError:
        return False
    return True


@st.composite
def examples(draw, dims=(1, 2, 2, 3), top=("block", "block", "parallel")) -> Example:
    ndim = draw(st.sampled_from(dims))
    tiny = ndim == 3
    ctx = Ctx(
        draw=draw,
        ndim=ndim,
        mode=draw(st.sampled_from(MODES)),
        max_c=3 if tiny else 6,
        max_k=3 if tiny else 4,
        max_len=3 if tiny else 4,
        max_depth=1 if tiny else 2,
    )
    c_in = draw(st.integers(1, ctx.max_c))
    if draw(st.sampled_from(top)) == "block":
        layers, c = draw_chain(ctx, c_in, depth=0)
        if not any(isinstance(m, CONVS) for layer in layers for m in layer.modules()):
            layers.append(draw_conv(ctx, c))
        block = rs.SqueezableBlock(*layers)
    else:
        block = draw_parallel(ctx, c_in, _channels(ctx, c_in), 0, first_conv=True)
    seed = draw(st.integers(0, 2**31 - 1))
    randomize(block.double(), torch.Generator().manual_seed(seed)).eval()
    hi = 7 if tiny else 13
    sizes = [draw(st.integers(2, hi // 2)) * 2 + 1 for _ in range(ndim)]  # odd, 5..hi
    return Example(block, ndim, c_in, fit_sizes(block, ndim, c_in, sizes, ctx.mode), seed)


def fit_sizes(block: nn.Module, ndim: int, c_in: int, sizes, mode: str = "zeros"):
    """The drawn odd sizes, grown by 2 until the block fits (rejects the example if never)."""
    for _ in range(8):
        if _feasible(block, ndim, c_in, sizes, mode):
            return tuple(sizes)
        sizes = [n + 2 for n in sizes]
    assume(False)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- properties ------------------------------------------------------------------------------
@settings(max_examples=4 * settings.default.max_examples)  # the central test: 4x the profile
@given(examples())
def test_squeeze_equals_block_float64(ex: Example):
    block, x = ex.block, ex.input()
    before = _state(block)
    with torch.no_grad():
        y = block(x)
        assert y.shape == naive(block, x).shape  # border-consistent padding keeps the shape
        conv = block.squeeze()
        note(f"squeezed: {conv}")
        assert type(conv) is CONV_CLASS[ex.ndim]
        assert conv.weight.dtype == torch.float64 and conv.bias.dtype == torch.float64
        assert tuple(conv.stride) == expected_stride(block, ex.ndim)
        assert_equivalent(conv(x), y, 1e-10)
    assert not block.deployed  # squeeze leaves the block alone
    _assert_same_state(before, _state(block))


@given(examples())
def test_squeeze_float32_matches_float64_reference(ex: Example):
    x = ex.input()
    with torch.no_grad():
        ref = ex.block(x)
        conv = copy.deepcopy(ex.block).float().squeeze()
        assert conv.weight.dtype == torch.float32
        assert_equivalent(conv(x.float()), ref, 1e-5)


@given(examples())
def test_deploy_is_exact_and_idempotent(ex: Example):
    block, x = ex.block, ex.input()
    with torch.no_grad():
        ref = block(x)
        b = copy.deepcopy(block).deploy()
        assert b.deployed
        assert type(b.conv) is CONV_CLASS[ex.ndim]
        keys = list(b.state_dict())
        assert keys == ["conv.weight", "conv.bias"]
        assert not b.training  # deploy keeps eval mode
        assert b.deploy() is b
        assert list(b.state_dict()) == keys
        assert_equivalent(b(x), ref, 1e-10)
        assert_equivalent(b.squeeze()(x), ref, 1e-10)  # a deployed block still squeezes


@given(examples())
def test_model_deploy_copies_unless_inplace(ex: Example):
    block, x = ex.block, ex.input()
    before = _state(block)
    with torch.no_grad():
        ref = block(x)
        out = rs.deploy(block)
        assert out is not block and out.deployed and not block.deployed
        _assert_same_state(before, _state(block))
        assert torch.equal(block(x), ref)
        assert_equivalent(out(x), ref, 1e-10)
        again = rs.deploy(out)
        assert list(again.state_dict()) == list(out.state_dict())
        assert_equivalent(again(x), ref, 1e-10)
        assert rs.deploy(block, inplace=True) is block
        assert block.deployed
        assert_equivalent(block(x), ref, 1e-10)


def _stands_alone(m: nn.Module) -> bool:
    """A nested block with a layer fixing its dimensionality and its channel count."""
    fixes_channels = any(isinstance(c, (*CONVS, _BatchNorm)) for c in m.modules())
    return isinstance(m, rs.Squeezable) and m.ndim is not None and fixes_channels


@given(examples(), st.data())
def test_nested_deployed_blocks_inside_training_form(ex: Example, data):
    """Deploying some inner blocks first changes neither the outputs nor the squeeze."""
    block, x = ex.block, ex.input()
    inner = [m for m in block.modules() if m is not block and _stands_alone(m)]
    assume(inner)
    with torch.no_grad():
        ref = block(x)
        for m in inner:
            if data.draw(st.booleans(), label=f"deploy {type(m).__name__}"):
                m.deploy()
        assert_equivalent(block(x), ref, 1e-10)
        assert_equivalent(block.squeeze()(x), ref, 1e-10)


# --- structure of the squeezed convolution ---------------------------------------------------
@st.composite
def grouped_chains(draw, depthwise: bool):
    ndim = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.integers(2, 3 if ndim == 3 else 6))
    mult = [1] if depthwise else [1, 2]
    layers, c = [], groups * draw(st.sampled_from(mult))
    c_in = c
    for _ in range(draw(st.integers(1, 2 if ndim == 3 else 3))):
        c_out = c if depthwise else groups * draw(st.sampled_from(mult))
        k = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
        s = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
        d = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
        p = draw(st.integers(0, 2))
        layers.append(CONV_CLASS[ndim](c, c_out, k, s, p, d, groups=groups))
        if draw(st.booleans()):
            layers.append(BN_CLASS[ndim](c_out))
        c = c_out
    block = rs.SqueezableBlock(*layers)
    seed = draw(st.integers(0, 2**31 - 1))
    randomize(block.double(), torch.Generator().manual_seed(seed)).eval()
    sizes = fit_sizes(block, ndim, c_in, (9 if ndim < 3 else 5,) * ndim)
    return Example(block, ndim, c_in, sizes, seed), groups


@given(grouped_chains(depthwise=True))
def test_depthwise_chain_stays_depthwise(case):
    ex, channels = case
    conv = ex.block.squeeze()
    assert conv.groups == conv.in_channels == conv.out_channels == channels
    with torch.no_grad():
        assert_equivalent(conv(ex.input()), ex.block(ex.input()), 1e-10)


@given(grouped_chains(depthwise=False))
def test_grouped_chain_keeps_groups(case):
    ex, groups = case
    conv = ex.block.squeeze()
    assert conv.groups == groups
    with torch.no_grad():
        assert_equivalent(conv(ex.input()), ex.block(ex.input()), 1e-10)


@given(
    st.sampled_from([1, 2, 3]),
    st.integers(2, 3),
    st.lists(
        st.tuples(st.integers(1, 4), st.integers(0, 3), st.booleans()), min_size=2, max_size=3
    ),
)
def test_dilated_chain_keeps_dilation(ndim, dilation, convs):
    """Stride-1 convs sharing dilation d compose to kernel sum(k_i - 1) + 1 with dilation d."""
    assume(any(k > 1 for k, _, _ in convs))
    layers = []
    for k, p, bn in convs:
        layers.append(CONV_CLASS[ndim](2, 2, k, padding=p, dilation=dilation))
        if bn:
            layers.append(BN_CLASS[ndim](2))
    block = randomize(rs.SqueezableBlock(*layers).double(), torch.Generator().manual_seed(0))
    block.eval()
    conv = block.squeeze()
    assert conv.dilation == (dilation,) * ndim
    assert conv.kernel_size == (sum(k - 1 for k, _, _ in convs) + 1,) * ndim
    size = max(5, dilation * sum(k - 1 for k, _, _ in convs) + 1) | 1  # odd, fits unpadded
    x = torch.randn(2, 2, *(size,) * ndim, dtype=torch.float64)
    with torch.no_grad():
        assert_equivalent(conv(x), block(x), 1e-10)


def test_two_dilated_3x3_give_5x5_dilation_2():
    block = rs.SqueezableBlock(
        nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 2, 3, padding=2, dilation=2)
    )
    conv = block.squeeze()
    assert conv.kernel_size == (5, 5) and conv.dilation == (2, 2) and conv.padding == (4, 4)


# --- RepVGG ----------------------------------------------------------------------------------
@st.composite
def repvgg_blocks(draw):
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    tiny = dims == 3
    c_in = draw(st.integers(1, 3 if tiny else 6))
    c_out = draw(st.sampled_from([c_in, *range(1, 4 if tiny else 7)]))
    stride = draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3 if tiny else 5))
    dilation = draw(st.integers(1, 2))
    if stride > 1 and dilation * (kernel - 1) % 2:
        kernel += 1  # an even window has no centre unless padding='same' (stride 1 only)
    groups = draw(st.sampled_from(_divisors(math.gcd(c_in, c_out))))
    mode = draw(st.sampled_from(MODES))
    block = rs.RepVGGBlock(
        c_in, c_out, kernel, stride, dilation, groups, padding_mode=mode, dims=dims
    )
    seed = draw(st.integers(0, 2**31 - 1))
    randomize(block.double(), torch.Generator().manual_seed(seed)).eval()
    sizes = (
        (7,) * dims if tiny else tuple(draw(st.sampled_from([7, 9, 11, 13])) for _ in range(dims))
    )
    return Example(block, dims, c_in, sizes, seed), (kernel, dilation, stride, groups)


@given(repvgg_blocks())
def test_repvgg_squeezes_to_its_main_kernel(case):
    ex, (kernel, dilation, stride, groups) = case
    x = ex.input()
    with torch.no_grad():
        ref = ex.block(x)
        assert ref.shape == naive(ex.block, x).shape
        conv = ex.block.squeeze()
        assert_equivalent(conv(x), ref, 1e-10)
        assert_equivalent(copy.deepcopy(ex.block).float().squeeze()(x.float()), ref, 1e-5)
    assert type(conv) is CONV_CLASS[ex.ndim]
    assert conv.stride == (stride,) * ex.ndim
    assert conv.groups == groups
    if kernel % 2:  # odd kernels are centred: the 1x1 and identity taps land on the grid
        assert conv.kernel_size == (kernel,) * ex.ndim
        assert conv.dilation == ((dilation if kernel > 1 else 1),) * ex.ndim


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_squeeze_keeps_padding_mode(dims):
    for mode in MODES:
        block = rs.RepVGGBlock(2, 2, padding_mode=mode, dims=dims)
        assert block.squeeze().padding_mode == mode
