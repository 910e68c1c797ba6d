"""Online squeezing: compose a block's exact kernel inside the forward pass, run one conv.

``mode="online"`` builds the block's kernel and bias from its parameters in every forward
pass (autograd flows through the composition, :mod:`repsqueeze.core.compose`) and runs a
single convolution; trailing BatchNorms of a chain run after it, on the convolution's
output, with batch statistics.

The structural part (how many parts are composed, the layout of the resulting conv) is a
:class:`Plan`, computed once per block and spatial dimensionality outside the forward pass
and rebuilt when a part is replaced. The forward pass has no host-device synchronisation and
no Python control flow on tensor values, so ``torch.compile(..., fullgraph=True)`` traces
it.

Reference: Hu et al., "Online Convolutional Re-parameterization", CVPR 2022 (OREPA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core import compose, geometry, primitives, squeeze
from repsqueeze.core.algebra import Layout
from repsqueeze.core.primitives import Values
from repsqueeze.core.terms import Ctx
from repsqueeze.core.tree import Combinator

_OWNER = "online"


@dataclass(frozen=True)
class Plan:
    """What online mode needs to know about a block's structure, computed once.

    Attributes:
        fingerprint: identities of the block's modules when the plan was made; a replaced
            part changes it and the plan is rebuilt.
        head: how many parts are composed into the kernel; the rest (trailing
            BatchNorms) run after the convolution.
        layout: the composed convolution (kernel size, groups, dilation, padding).
    """

    fingerprint: tuple[int, ...]
    head: int
    layout: Layout


def fingerprint(block: nn.Module) -> tuple[int, ...]:
    """The identities of a block's modules, in order."""
    return tuple(map(id, block.modules()))


def head_of(block: Combinator) -> int:
    """How many parts online mode composes: all, but a chain's trailing BatchNorms, which
    run after the composed convolution with batch statistics."""
    parts = block.named_parts()
    n = len(parts)
    while block.combine == "chain" and n > 1 and isinstance(parts[n - 1][1], _BatchNorm):
        n -= 1
    return n


def plan(block: Combinator, ndim: int) -> Plan:
    """The block's plan for ``ndim`` spatial dims; rebuilt (outside ``torch.compile``) when
    a part was replaced since it was made (then everything derived from the parts is
    dropped: :meth:`~repsqueeze.core.tree.Combinator.forget`)."""
    found = block.memo(_OWNER).get(ndim)
    if torch.compiler.is_compiling() and found is not None:
        return found
    key = fingerprint(block)
    if found is None or found.fingerprint != key:
        if found is not None:
            block.forget()
        head = head_of(block)
        found = Plan(key, head, squeeze.layout(block, ndim, head))
        block.memo(_OWNER)[ndim] = found
    return found


def forward(block: Combinator, x: Tensor, ndim: int) -> Tensor:
    """Runs a block in online mode: compose the kernel, one convolution, the tail."""
    p = plan(block, ndim)
    lay = p.layout
    param = next(block.parameters(), x)
    ctx = Ctx(ndim, Values("live", param.dtype, param.device))
    term = compose.head_term(block, p.head, lay.in_channels, ctx)
    weight, bias = compose.pack(term, lay, lay.in_channels, ctx)
    mode, padding = geometry.geometry_of(block, ndim).padding_mode, lay.padding
    if mode not in (None, "zeros"):  # zeros are the conv's own padding: no padded copy
        x, padding = primitives.pad(x, tuple((q, q) for q in padding), mode), 0
    y = primitives.CONV_FN[ndim](x, weight, bias, lay.stride, padding, lay.dilation, lay.groups)
    for _, bn in block.named_parts()[p.head :]:
        y = bn(y)
    return y


def composed(block: Combinator, ndim: int) -> tuple[Tensor, Tensor | None]:
    """The live ``(weight, bias)`` online mode convolves with (autograd kept)."""
    p = plan(block, ndim)
    param = next(block.parameters())
    ctx = Ctx(ndim, Values("live", param.dtype, param.device))
    term = compose.head_term(block, p.head, p.layout.in_channels, ctx)
    return compose.pack(term, p.layout, p.layout.in_channels, ctx)


def bn_blocks_online(block: Combinator, ndim: int) -> bool:
    """Whether a BatchNorm that online mode would fold uses batch statistics right now."""
    head = block.named_parts()[: plan(block, ndim).head]
    return any(
        isinstance(m, _BatchNorm) and primitives.uses_batch_stats(m)
        for _, h in head
        for m in h.modules()
    )
