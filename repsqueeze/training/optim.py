"""Training recipes' optimisation rules: which parameters are weight-decayed, the regularisers
that replace plain weight decay for re-parameterized blocks, and a per-step learning-rate
schedule with linear warmup.

- :func:`weight_decay_groups`: no weight decay on normalisation layers, biases and
  per-channel scales (the rule of timm's ``param_groups_weight_decay``, and RepVGG's
  published recipe, which decays neither ``bn.weight`` nor ``bn.bias``).
- :func:`repvgg_custom_l2`: RepVGG's custom L2 on the equivalent kernel of each block
  (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021; the
  official repository's ``get_custom_L2``): the ring of the k x k kernel is decayed as
  usual, its centre together with the 1x1 kernel through the BN-scaled sum they deploy to.
- :func:`dbb_identity_l2`: DBB's 1x1 -> k x k branch starts its 1x1 at the identity
  (DBB's ``IdentityBasedConv1x1`` stores the kernel minus the identity, so its weight
  decay pulls the kernel towards the identity, not towards zero); here that 1x1 is decayed
  on its difference from the identity (Ding et al., "Diverse Branch Block", CVPR 2021).
- :func:`warmup_schedule`: torch's ``LinearLR`` warmup then ``CosineAnnealingLR`` or
  ``MultiStepLR``, chained with ``SequentialLR`` and stepped every optimizer step.

The regularisers are L2 terms ``0.5 * weight_decay * sum(...)`` added to the loss, as in the
papers (whose optimizer is SGD, where such a term and weight decay are the same); the
parameters they cover are left out of the optimizer's own weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

from repsqueeze.zoo import DiverseBranchBlock, MobileOneBlock

_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass
class Regularizer:
    """An L2 term that replaces the optimizer's weight decay on ``params``.

    Attributes:
        name: what it is, for logs (``"repvgg_custom_l2"``).
        params: the parameters it covers (the optimizer must not decay them).
        term: ``term()`` is the sum to weight by ``0.5 * weight_decay``.
    """

    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    term: Callable[[], Tensor] = lambda: torch.zeros(())


def is_scale(module: nn.Module) -> bool:
    """A per-channel scale: a depthwise 1x1 convolution (OREPA's branch scales)."""
    if not isinstance(module, _ConvNd):
        return False
    return all(k == 1 for k in module.kernel_size) and module.groups == module.out_channels == module.in_channels  # fmt: skip


def no_decay_params(net: nn.Module) -> list[nn.Parameter]:
    """The parameters of normalisation layers and per-channel scales, biases, and every
    parameter with at most one dimension."""
    found: dict[int, nn.Parameter] = {}
    for module in net.modules():
        whole = isinstance(module, _NORMS) or is_scale(module)
        for name, p in module.named_parameters(recurse=False):
            if whole or name == "bias" or p.ndim <= 1:
                found[id(p)] = p
    return list(found.values())


def weight_decay_groups(
    net: nn.Module, no_decay_norm_bias: bool = True, exclude: Iterable[nn.Parameter] = ()
) -> list[dict]:
    """Optimizer parameter groups: the decayed parameters (the optimizer's own
    ``weight_decay``), then those with ``weight_decay=0``.

    Args:
        net: the network.
        no_decay_norm_bias: leave norm layers, biases and per-channel scales undecayed
            (:func:`no_decay_params`); ``False`` decays them like any weight.
        exclude: further parameters not to decay (those a :class:`Regularizer` covers).

    Frozen parameters (``requires_grad=False``) are left out.
    """
    skip = {id(p) for p in exclude}
    if no_decay_norm_bias:
        skip |= {id(p) for p in no_decay_params(net)}
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) not in skip]
    rest = [p for p in params if id(p) in skip]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def _conv_bn(branch: nn.Module) -> tuple[_ConvNd, _BatchNorm] | None:
    """``(conv, bn)`` when ``branch`` is exactly a conv followed by a BatchNorm."""
    layers = list(branch) if isinstance(branch, nn.Sequential) else []
    if len(layers) == 2 and isinstance(layers[0], _ConvNd) and isinstance(layers[1], _BatchNorm):
        return layers[0], layers[1]
    return None


def _bn_scale(bn: _BatchNorm, ndim: int) -> Tensor:
    """``gamma / sqrt(running_var + eps)``, detached, shaped to multiply a kernel."""
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    return scale.detach().reshape(-1, *[1] * (ndim - 1))


def repvgg_custom_l2(net: nn.Module) -> Regularizer:
    """RepVGG's custom L2 over every RepVGG-style block of ``net`` (a :class:`MobileOneBlock`
    with one k x k conv-BN branch and a 1x1 conv-BN branch, in its training form).

    Per block, with ``K`` the k x k kernel, ``P`` the 1x1 kernel and ``t_K``, ``t_P`` their
    BNs' ``gamma / sigma`` (running statistics, detached): the ring of ``K`` (all but its
    centre) is summed squared as usual; the centre enters through the centre of the
    deployed kernel, ``(K_c t_K + P t_P)^2 / (t_K^2 + t_P^2)``. Both kernels are covered.

    Raises:
        ValueError: ``net`` has no such block (RepVGG's custom L2 would regularise nothing).
    """
    pairs = []
    for module in net.modules():
        if not isinstance(module, MobileOneBlock) or module.deployed:
            continue
        branches = [_conv_bn(b) for b in module.branches]
        kxk = [b for b in branches if b is not None and max(b[0].kernel_size) > 1]
        ones = [b for b in branches if b is not None and max(b[0].kernel_size) == 1]
        if len(kxk) == 1 and len(ones) == 1 and min(kxk[0][0].kernel_size) % 2 == 1:
            pairs.append((kxk[0], ones[0]))
    if not pairs:
        raise ValueError(
            "repvgg_custom_l2: the network has no RepVGG block in its training form (a k x k "
            "conv-BN branch beside a 1x1 conv-BN branch); use block=repvgg"
        )

    def term() -> Tensor:
        total = []
        for (conv_k, bn_k), (conv_1, bn_1) in pairs:
            kernel, ndim = conv_k.weight, conv_k.weight.ndim
            centre = (slice(None), slice(None), *[slice(k // 2, k // 2 + 1) for k in conv_k.kernel_size])  # fmt: skip
            t_k, t_1 = _bn_scale(bn_k, ndim), _bn_scale(bn_1, ndim)
            ring = kernel.square().sum() - kernel[centre].square().sum()
            merged = kernel[centre] * t_k + conv_1.weight * t_1
            total.append(ring + (merged.square() / (t_k.square() + t_1.square())).sum())
        return torch.stack(total).sum()

    params = [p for (conv_k, _), (conv_1, _) in pairs for p in (conv_k.weight, conv_1.weight)]
    return Regularizer("repvgg_custom_l2", params, term)


def _identity_like(conv: _ConvNd) -> Tensor:
    """The kernel of the identity map in ``conv``'s shape (as DBB initialises its 1x1)."""
    weight = torch.zeros_like(conv.weight)  # (C, C // groups, 1, ...)
    idx = torch.arange(conv.out_channels, device=weight.device)
    weight[(idx, idx % weight.shape[1], *[0] * (weight.ndim - 2))] = 1
    return weight


def dbb_identity_l2(net: nn.Module) -> Regularizer:
    """``sum((W - I)^2)`` over the identity-initialised 1x1 of every DBB 1x1 -> k x k
    branch (the chain's first conv when its width equals the block's input channels).

    Raises:
        ValueError: ``net`` has no DBB with an identity-initialised 1x1.
    """
    convs = []
    for module in net.modules():
        if not isinstance(module, DiverseBranchBlock) or module.deployed:
            continue
        for branch in module.branches:
            layers = list(branch) if isinstance(branch, nn.Sequential) else []
            if len(layers) != 4 or not all(isinstance(m, _ConvNd) for m in layers[::2]):
                continue  # not the 1x1 -> BN -> k x k -> BN chain (the pooling branch)
            first = layers[0]
            if all(k == 1 for k in first.kernel_size) and first.in_channels == first.out_channels:
                convs.append(first)
    if not convs:
        raise ValueError(
            "dbb_identity_l2: the network has no Diverse Branch Block whose 1x1 -> k x k "
            "branch starts at the identity; use block=dbb"
        )
    targets = {id(c): _identity_like(c).detach() for c in convs}

    def term() -> Tensor:
        total = []
        for conv in convs:
            target = targets[id(conv)].to(conv.weight)
            total.append((conv.weight - target).square().sum())
        return torch.stack(total).sum()

    return Regularizer("dbb_identity_l2", [c.weight for c in convs], term)


def warmup_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 1e-3,
    decay: str = "cosine",
    min_lr: float = 0.0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
) -> LRScheduler:
    """A per-step schedule: linear warmup from ``warmup_start_factor * lr`` to ``lr`` over
    ``warmup_epochs``, then cosine decay to ``min_lr`` at ``total_steps``, or
    steps by ``gamma`` at the ``milestones`` (epochs); torch's ``SequentialLR`` of
    ``LinearLR`` and ``CosineAnnealingLR`` / ``MultiStepLR``.

    :class:`repsqueeze.training.lit.Classifier` fills in ``total_steps`` and ``steps_per_epoch`` from
    the trainer and steps it after every optimizer step.

    Args:
        optimizer: the optimizer.
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch (converts the epochs below to steps).
        warmup_epochs: length of the warmup, in epochs (fractions allowed); 0: none.
        warmup_start_factor: the first step's learning rate, as a fraction of ``lr``.
        decay: ``"cosine"`` or ``"step"``.
        min_lr: the cosine's final learning rate.
        milestones: epochs (counted from the start) at which ``"step"`` multiplies the
            learning rate by ``gamma``.
        gamma: the factor of ``"step"``.

    Raises:
        ValueError: an unknown ``decay``, or an argument out of range.
    """
    if decay not in ("cosine", "step"):
        raise ValueError(f"decay must be 'cosine' or 'step', got {decay!r}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if not 0 < warmup_start_factor <= 1:
        raise ValueError(f"warmup_start_factor must be in (0, 1], got {warmup_start_factor}")
    total_steps, steps_per_epoch = max(1, int(total_steps)), max(1, int(steps_per_epoch))
    warmup = min(round(warmup_epochs * steps_per_epoch), total_steps - 1)
    if decay == "cosine":
        main: LRScheduler = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup), eta_min=min_lr)  # fmt: skip
    else:
        steps = sorted(max(1, round(m * steps_per_epoch) - warmup) for m in milestones)
        main = MultiStepLR(optimizer, milestones=steps, gamma=gamma)
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=warmup_start_factor, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
