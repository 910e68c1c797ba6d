"""Whole-model conversions: deploy every re-parameterizable block of any ``nn.Module``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from repsqueeze.blocks import Squeezable

# Method names other libraries use for "switch this block to its deployed form":
# timm/MobileOne ``reparameterize``, RepVGG/DBB/ACNet ``switch_to_deploy``, YOLO-style ``fuse``.
FOREIGN_HOOKS = ("reparameterize", "switch_to_deploy", "fuse")


@torch.no_grad()
def deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Collapses every squeezable block of ``model`` into one convolution.

    Our blocks are deployed with :meth:`Squeezable.deploy`; blocks of other libraries that
    follow the common conventions (a ``reparameterize()``, ``switch_to_deploy()`` or
    ``fuse()`` method) are deployed by calling that method. Idempotent.

    Args:
        model: any module.
        inplace: mutate ``model``; by default a deep copy is deployed and ``model`` is
            left untouched.

    Returns:
        The deployed model (``model`` itself when ``inplace``).
    """
    if not inplace:
        model = copy.deepcopy(model)
    _deploy_tree(model)
    return model


def _deploy_tree(module: nn.Module) -> None:
    if isinstance(module, Squeezable):
        module.deploy()
        return
    for hook in FOREIGN_HOOKS:
        method = getattr(module, hook, None)
        if callable(method):
            method()
            break
    for child in list(module.children()):
        _deploy_tree(child)


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Sets ``mode`` (``"chain"``, ``"online"`` or ``"auto"``) on every top-level block.

    Args:
        model: any module.
        mode: see :meth:`repsqueeze.blocks.Squeezable.set_mode`.

    Returns:
        ``model``, changed in place.
    """
    if isinstance(model, Squeezable):
        model.set_mode(mode)
        return model
    for child in model.children():
        set_mode(child, mode)
    return model
