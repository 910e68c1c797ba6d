"""Shared test helpers: seeded initialisation, the naive chain, and independent oracles.

The oracles here (:func:`naive`, :func:`expected_stride`, :func:`expected_pad`) re-derive
from the layers' own attributes what the library is supposed to compute, so the tests do
not check the library against itself.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

import repsqueeze as rs

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
CONV_CLASS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN_CLASS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL_CLASS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _uniform(like: Tensor, low: float, high: float, generator: torch.Generator) -> Tensor:
    u = torch.rand(like.shape, generator=generator, dtype=torch.float64)
    return (low + (high - low) * u).to(like)


@torch.no_grad()
def randomize_bn(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Randomizes every BatchNorm's statistics and affine parameters (else folding is trivial).

    ``running_mean ~ U(-1, 1)``, ``running_var ~ U(0.5, 2)``, ``weight ~ U(0.5, 2)``,
    ``bias ~ U(-1, 1)``.
    """
    for m in module.modules():
        if not isinstance(m, _BatchNorm):
            continue
        if m.running_mean is not None:
            m.running_mean.copy_(_uniform(m.running_mean, -1, 1, generator))
            m.running_var.copy_(_uniform(m.running_var, 0.5, 2, generator))
        if m.affine:
            m.weight.copy_(_uniform(m.weight, 0.5, 2, generator))
            m.bias.copy_(_uniform(m.bias, -1, 1, generator))
    return module


@torch.no_grad()
def randomize(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Seeded re-initialisation of every conv (``N(0, 1/fan_in)``, bias ``N(0, 1/4)``) and BN."""
    for m in module.modules():
        if isinstance(m, CONVS) and m.weight.device.type != "meta":
            fan_in = m.weight[0].numel()
            w = torch.randn(m.weight.shape, generator=generator, dtype=torch.float64)
            m.weight.copy_(w / fan_in**0.5)
            if m.bias is not None:
                b = torch.randn(m.bias.shape, generator=generator, dtype=torch.float64)
                m.bias.copy_(b / 2)
    return randomize_bn(module, generator)


def naive(module: nn.Module, x: Tensor) -> Tensor:
    """The same layers run the ordinary way: every layer with its own padding."""
    if isinstance(module, rs.Parallel):
        return sum(naive(b, x) for b in module.branches)
    if isinstance(module, rs.Concat):
        xs = torch.split(x, module.split, 1) if module.split else [x] * len(module.branches)
        return torch.cat([naive(b, xb) for b, xb in zip(module.branches, xs, strict=True)], 1)
    if isinstance(module, rs.SqueezableBlock):
        layers = list(module.layers)
    elif isinstance(module, nn.Sequential):
        layers = list(module)
    else:
        return module(x)
    for layer in layers:
        x = naive(layer, x)
    return x


def _tup(v, ndim: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * ndim


def _parts(module: nn.Module) -> list[nn.Module] | None:
    if isinstance(module, rs.SqueezableBlock):
        return list(module.layers)
    if isinstance(module, nn.Sequential):
        return list(module)
    return None


def expected_stride(module: nn.Module, ndim: int) -> tuple[int, ...]:
    """Stride of the composite: product along chains, shared across branches."""
    if isinstance(module, rs.Squeezable) and module.deployed:
        return tuple(module.conv.stride)
    if isinstance(module, (rs.Parallel, rs.Concat)):
        return expected_stride(module.branches[0], ndim)
    parts = _parts(module)
    if parts is not None:
        total = (1,) * ndim
        for p in parts:
            total = tuple(a * b for a, b in zip(total, expected_stride(p, ndim), strict=True))
        return total
    if isinstance(module, CONVS):
        return tuple(module.stride)
    if isinstance(module, POOLS):
        return _tup(module.stride or module.kernel_size, ndim)
    return (1,) * ndim


def layer_pad(module: nn.Module, ndim: int) -> tuple[tuple[int, int], ...]:
    """``(left, right)`` padding of one conv or pool, as PyTorch applies it."""
    if isinstance(module, CONVS):
        if module.padding == "valid":
            return ((0, 0),) * ndim
        if module.padding == "same":
            spans = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
            return tuple((t // 2, t - t // 2) for t in spans)
        return tuple((p, p) for p in module.padding)
    if isinstance(module, POOLS):
        return tuple((p, p) for p in _tup(module.padding, ndim))
    return ((0, 0),) * ndim


def expected_pad(module: nn.Module, ndim: int) -> tuple[tuple[int, int], ...]:
    """Total border ``P = sum_i p_i * prod_{j<i} s_j`` (max over parallel/concat branches)."""
    if isinstance(module, (rs.Parallel, rs.Concat)):
        pads = [expected_pad(b, ndim) for b in module.branches]
        return tuple((max(p[d][0] for p in pads), max(p[d][1] for p in pads)) for d in range(ndim))
    parts = _parts(module)
    if parts is not None:
        total = [[0, 0] for _ in range(ndim)]
        stride = [1] * ndim
        for p in parts:
            own, s = expected_pad(p, ndim), expected_stride(p, ndim)
            for d in range(ndim):
                total[d][0] += stride[d] * own[d][0]
                total[d][1] += stride[d] * own[d][1]
                stride[d] *= s[d]
        return tuple(map(tuple, total))
    return layer_pad(module, ndim)


def max_err(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def assert_equivalent(out: Tensor, ref: Tensor, rtol: float) -> None:
    """``max|out - ref| <= rtol * max(1, max|ref|)``."""
    scale = max(1.0, ref.abs().max().item())
    err = max_err(out, ref)
    assert err <= rtol * scale, f"max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


ROOT = Path(__file__).resolve().parents[1]


def receptive_window(module: nn.Module, ndim: int) -> tuple[tuple[int, int], ...]:
    """Per spatial dim ``(lo, hi)``: output ``j`` of the naive chain reads input positions
    ``j * S + lo .. j * S + hi`` (negative or past the end: padding), ``S`` the stride.

    Composed from each layer's own padding, kernel and dilation (chains: ``lo = lo_a + S_a
    lo_b``; branches: the union), independently of the library's geometry.
    """
    if isinstance(module, rs.Squeezable) and module.deployed:
        return receptive_window(module.conv, ndim)
    if isinstance(module, (rs.Parallel, rs.Concat)):
        wins = [receptive_window(b, ndim) for b in module.branches]
        return tuple((min(w[d][0] for w in wins), max(w[d][1] for w in wins)) for d in range(ndim))
    parts = _parts(module)
    if parts is not None:
        total, stride = [(0, 0)] * ndim, (1,) * ndim
        for p in parts:
            own = receptive_window(p, ndim)
            total = [
                (lo + s * a, hi + s * b)
                for (lo, hi), (a, b), s in zip(total, own, stride, strict=True)
            ]
            stride = tuple(a * b for a, b in zip(stride, expected_stride(p, ndim), strict=True))
        return tuple(total)
    pads = layer_pad(module, ndim)
    if isinstance(module, CONVS):
        spans = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    elif isinstance(module, POOLS):
        spans = [k - 1 for k in _tup(module.kernel_size, ndim)]
    else:
        spans = [0] * ndim
    return tuple((-pl, -pl + e) for (pl, _), e in zip(pads, spans, strict=True))


def interior(module: nn.Module, sizes: tuple[int, ...]) -> tuple[slice, ...]:
    """Index of the outputs whose whole receptive window lies inside the input: there no
    layer reads its padding, so every way of padding gives the naive chain's values."""
    ndim = len(sizes)
    stride = expected_stride(module, ndim)
    index = [slice(None), slice(None)]
    for (lo, hi), s, n in zip(receptive_window(module, ndim), stride, sizes, strict=True):
        first = -(lo // s)  # ceil(-lo / s): j * s + lo >= 0
        last = (n - 1 - hi) // s  # j * s + hi <= n - 1
        index.append(slice(first, max(first, last + 1)))
    return tuple(index)


def interior_sizes(module: nn.Module, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """``sizes``, each grown (keeping its parity) until the interior is not empty."""
    ndim = len(sizes)
    stride = expected_stride(module, ndim)
    grown = []
    for (lo, hi), s, n in zip(receptive_window(module, ndim), stride, sizes, strict=True):
        need = -(lo // s) * s + hi + 1  # the first interior output fits
        grown.append(n + max(0, need - n + 1) // 2 * 2)
    return tuple(grown)


def assert_interior_matches_naive(block: nn.Module, x: Tensor, out: Tensor, rtol: float) -> None:
    """``out = block(x)`` equals the naive chain (every layer with its own padding, plain
    PyTorch modules) on the interior, which must not be empty."""
    with torch.no_grad():
        ref = naive(block, x)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    index = interior(block, tuple(x.shape[2:]))
    assert out[index].numel() > 0, f"empty interior {index} for input {tuple(x.shape)}"
    assert_equivalent(out[index], ref[index], rtol)


def assert_gradients_match_finite_differences(module: nn.Module, x: Tensor) -> None:
    """Autograd's gradients of ``module(x)`` with respect to ``x`` and every parameter equal
    central finite differences (``torch.autograd.gradcheck``, float64, fast mode: random
    projections of the Jacobian)."""
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in module.parameters()]

    def call(inp: Tensor, *values: Tensor) -> Tensor:
        return torch.func.functional_call(module, dict(zip(names, values, strict=True)), (inp,))

    inputs = (x.detach().double().requires_grad_(True), *params)
    assert all(t.dtype == torch.float64 for t in inputs), "gradcheck needs float64"
    assert torch.autograd.gradcheck(call, inputs, fast_mode=True)


def bn_and_pad(bn: _BatchNorm, y: Tensor, fill: Tensor | None = None) -> Tensor:
    """DBB's BN-and-pad with batch statistics, made exact: ``bn`` on ``y`` with the batch's
    statistics (running statistics untouched), padded by 1 with the value the same
    normalisation gives the border constant ``fill`` (per channel; zeros when ``None``)."""
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)
    fill = torch.zeros_like(mean) if fill is None else fill
    value = bn.bias + (fill - mean) * bn.weight / torch.sqrt(var + bn.eps)
    z = torch.nn.functional.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    ring = torch.ones(1, 1, *y.shape[2:], dtype=y.dtype)
    ring = 1 - torch.nn.functional.pad(ring, [1, 1, 1, 1])  # 1 on the border, 0 inside
    return torch.nn.functional.pad(z, [1, 1, 1, 1]) + value.reshape(1, -1, 1, 1) * ring


def saved_bytes(module: nn.Module, x: Tensor, backward: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``module(x)``
    (parameters excluded); ``backward``: run the backward pass too."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
        if backward:
            y.sum().backward()
    return sum(storages.values())


def with_mode(block: nn.Module, mode: str) -> nn.Module:
    """A copy of ``block`` (or of a model) in run mode ``mode``."""
    return rs.set_mode(copy.deepcopy(block), mode)


def _step(block: nn.Module, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, dict]:
    """Output, input gradient and parameter gradients of ``sum(weight * block(x))``."""
    x = x.clone().requires_grad_(True)
    y = block(x)
    (y * weight).sum().backward()
    grads = {
        name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        for name, p in block.named_parameters()
    }
    return y.detach(), x.grad.detach(), grads


def assert_matches_chain(block: nn.Module, x: Tensor, tol: float, mode: str = "online") -> None:
    """Copies of ``block`` in ``mode`` and in chain mode agree in output and every gradient.

    Outputs are compared relative to ``max(1, max|y|)``; gradients (of every parameter and of
    the input) relative to the largest gradient of any parameter.
    """
    chain, other = with_mode(block, "chain"), with_mode(block, mode)
    with torch.no_grad():
        shape = copy.deepcopy(chain)(x).shape
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    y_c, gx_c, g_c = _step(chain, x, weight)
    y_o, gx_o, g_o = _step(other, x, weight)
    assert_equivalent(y_o, y_c, tol)
    scale = max([g.abs().max().item() for g in g_c.values() if g.numel()] + [1e-30])
    assert list(g_o) == list(g_c)
    for name in g_c:
        err = (g_o[name].double() - g_c[name].double()).abs().max().item()
        assert err <= tol * scale, f"grad of {name}: {err:.3e} > {tol:.0e} * {scale:.3e}"
    err = (gx_o.double() - gx_c.double()).abs().max().item()
    assert err <= tol * max(scale, gx_c.abs().max().item()), f"input grad: {err:.3e}"
    assert_same_buffers(other, chain, tol)


def assert_same_buffers(a: nn.Module, b: nn.Module, tol: float) -> None:
    """The floating-point buffers (BatchNorm statistics) of ``a`` and ``b`` agree."""
    for (name, u), (_, v) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        if u.is_floating_point():
            assert_equivalent(u, v, tol)
        else:
            assert torch.equal(u, v), name
