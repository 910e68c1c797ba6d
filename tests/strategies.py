"""Hypothesis strategies shared by the equivalence, online and Concat tests: blocks over the whole
accepted space.

Chains of 1-4 layers (convs with rectangular and even kernels, stride, dilation, groups,
bias, every kind of padding; BatchNorm before and after convs; Identity; AvgPool; nested
``nn.Sequential``, ``SqueezableBlock`` and ``Parallel`` with aligned branches), in 1-D, 2-D
and 3-D, with every padding mode. :func:`examples` draws a whole block, randomized and in
eval mode, with an odd input size it fits; ``bn=False`` leaves BatchNorm out (for training
mode online, which cannot fold batch statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from helpers import (
    BN_CLASS,
    CONV_CLASS,
    CONVS,
    POOL_CLASS,
    expected_pad,
    naive,
    randomize,
)
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs

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
    bn: bool = True  # BatchNorm layers and branches allowed


def divisors(n: int) -> list[int]:
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
    groups = c_in if depthwise else draw(st.sampled_from(divisors(math.gcd(c_in, c_out))))
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
    kinds = ["conv", "conv", "conv", *(["bn", "bn"] if ctx.bn else []), "identity", "pool"]
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
        kinds += ["bn", "identity"] if ctx.bn else ["identity"]
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
    kinds = ["conv", "conv", *(["bn"] if ctx.bn else []), "identity", "pool"]
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

    def input(
        self, dtype: torch.dtype = torch.float64, batch: int = 2, sizes: tuple[int, ...] = ()
    ) -> torch.Tensor:
        """A seeded input of the drawn sizes (or of ``sizes``)."""
        g = torch.Generator().manual_seed(self.seed + 1)
        shape = (batch, self.c_in, *(sizes or self.sizes))
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

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
def examples(draw, dims=(1, 2, 2, 3), top=("block", "block", "parallel"), bn=True) -> Example:
    """A randomized block in eval mode (float64) and odd input sizes it fits.

    Args:
        dims: spatial dimensionalities to draw from.
        top: kinds of the outermost node (``"block"``: a chain, ``"parallel"``).
        bn: allow BatchNorm layers and branches.
    """
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
        bn=bn,
    )
    c_in = draw(st.integers(1, ctx.max_c))
    if draw(st.sampled_from(top)) == "block":
        layers, c = draw_chain(ctx, c_in, depth=0)
        if not any(isinstance(m, CONVS) for layer in layers for m in layer.modules()):
            layers.append(draw_conv(ctx, c))
        block = rs.SqueezableBlock(*layers)
    else:
        block = draw_parallel(ctx, c_in, _channels(ctx, c_in), 0, first_conv=True)
    return _example(ctx, block, c_in, hi=7 if tiny else 13)


def _example(ctx: Ctx, block: nn.Module, c_in: int, hi: int) -> Example:
    """The drawn block randomized (float64, eval) with odd input sizes 5..``hi`` it fits."""
    seed = ctx.draw(st.integers(0, 2**31 - 1))
    randomize(block.double(), torch.Generator().manual_seed(seed)).eval()
    sizes = [ctx.draw(st.integers(2, hi // 2)) * 2 + 1 for _ in range(ctx.ndim)]  # odd
    return Example(block, ctx.ndim, c_in, fit_sizes(block, ctx.ndim, c_in, sizes, ctx.mode), seed)


def fit_sizes(block: nn.Module, ndim: int, c_in: int, sizes, mode: str = "zeros"):
    """The drawn odd sizes, grown by 2 until the block fits (rejects the example if never)."""
    for _ in range(8):
        if _feasible(block, ndim, c_in, sizes, mode):
            return tuple(sizes)
        sizes = [n + 2 for n in sizes]
    assume(False)


# --- Concat nodes inside chains and parallels, and containing them --------------------------
def _fixes_channels(branches: list[nn.Module]) -> bool:
    return any(isinstance(m, (*CONVS, _BatchNorm)) for b in branches for m in b.modules())


def _slack(ctx: Ctx) -> tuple[int, ...]:
    return tuple(ctx.draw(st.sampled_from([-1, -1, -2, -3])) for _ in range(ctx.ndim))


def _split(ctx: Ctx, c_in: int, n: int) -> tuple[int, ...] | None:
    """``n`` positive channel counts summing to ``c_in`` (a split input), or ``None``."""
    if c_in < n or not ctx.draw(st.booleans()):
        return None
    cuts = sorted(ctx.draw(st.sets(st.integers(1, c_in - 1), min_size=n - 1, max_size=n - 1)))
    return tuple(b - a for a, b in zip([0, *cuts], [*cuts, c_in], strict=True))


def draw_concat(ctx: Ctx, c_in: int, depth: int, stride, slack) -> tuple[rs.Concat, int]:
    """2-3 branches sharing stride and slack, any branch of ``test_equivalence`` (chains,
    parallels, single layers) or a nested Concat node, reading the whole input or a split
    of it; returns the Concat and its output channels."""
    draw = ctx.draw
    n = draw(st.integers(2, 3))
    split = _split(ctx, c_in, n)
    branches, c_out = [], 0
    for c_branch in split or (c_in,) * n:
        if depth < ctx.max_depth and draw(st.integers(0, 3)) == 0:
            branch, c = draw_concat_node(ctx, c_branch, depth + 1, stride, slack)
        else:
            c = _channels(ctx, c_branch)
            branch = draw_branch(ctx, c_branch, c, stride, slack, depth)
        branches.append(branch)
        c_out += c
    if split is None and not _fixes_channels(branches):  # only Identity/AvgPool branches
        c = _channels(ctx, c_in)
        branches.append(draw_conv(ctx, c_in, c, stride, slack))
        c_out += c
    return rs.Concat(*branches, split=split), c_out


def draw_concat_node(ctx: Ctx, c_in: int, depth: int, stride, slack) -> tuple[nn.Module, int]:
    """A Concat alone, summed with an aligned branch in a Parallel, or followed by a centred
    conv in a Sequential; the node has ``stride`` and ``slack``."""
    concat, c = draw_concat(ctx, c_in, depth, stride, slack)
    kind = ctx.draw(st.sampled_from(["concat", "parallel", "seq"]))
    if kind == "parallel":
        other = draw_branch(ctx, c_in, c, stride, slack, depth + 1)
        return rs.Parallel(*ctx.draw(st.permutations([concat, other]))), c
    if kind == "seq":
        after = draw_conv(ctx, c, None, (1,) * ctx.ndim, (-1,) * ctx.ndim)
        return nn.Sequential(concat, after), after.out_channels
    return concat, c


@st.composite
def concat_examples(draw) -> Example:
    """A Concat at the top, a Concat node inside a chain, or one summed in a Parallel."""
    ndim = draw(st.sampled_from([1, 2, 2, 3]))
    tiny = ndim == 3
    ctx = Ctx(
        draw=draw,
        ndim=ndim,
        mode=draw(st.sampled_from(MODES)),
        max_c=3 if tiny else 4,
        max_k=3,
        max_len=2,
        max_depth=1 if tiny else 2,
    )
    c_in = draw(st.integers(1, ctx.max_c))
    stride, slack = _stride(ctx), _slack(ctx)
    top = draw(st.sampled_from(["concat", "chain", "parallel"]))
    if top == "concat":
        block, _ = draw_concat(ctx, c_in, 0, stride, slack)
    elif top == "parallel":
        node, c = draw_concat_node(ctx, c_in, 1, stride, slack)
        block = rs.Parallel(node, draw_branch(ctx, c_in, c, stride, slack, 1))
    else:
        before, c = draw_chain(ctx, c_in, depth=1) if draw(st.booleans()) else ([], c_in)
        node, c = draw_concat_node(ctx, c, 1, stride, slack)
        after, _ = draw_chain(ctx, c, depth=1) if draw(st.booleans()) else ([], c)
        block = rs.SqueezableBlock(*before, node, *after)
    return _example(ctx, block, c_in, hi=7 if tiny else 11)
