"""Deploying a whole model: every block of ours, and other libraries' blocks by their own
``reparameterize()`` / ``switch_to_deploy()`` / ``fuse()``; optionally unwrapped to bare
convolutions."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from repsqueeze.core.blocks import Squeezable
from repsqueeze.core.hooks import check_inner_hooks
from repsqueeze.core.squeeze import deploy_blocks
from repsqueeze.surgery.hooks import FOREIGN_HOOKS, check_module, is_hook, without_wrappers
from repsqueeze.surgery.origin import ORIGIN, Origin


@torch.no_grad()
def deploy(model: nn.Module, inplace: bool = False, unwrap: bool = False) -> nn.Module:
    """Collapses every squeezable block of ``model`` into one convolution.

    Our blocks are deployed with :meth:`Squeezable.deploy`; blocks of other libraries that
    follow the common conventions (a ``reparameterize()``, ``switch_to_deploy()`` or
    ``fuse()`` method taking no required argument) are deployed by calling that method, and
    a module the method returns takes the block's place in its parent (timm's ``fuse()``
    convention; ``reparameterize()`` works in place). Idempotent. A block used at several
    places of the model is deployed once and stays shared.

    A ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` wrapper is taken
    off: the module it wraps is deployed and returned, unwrapped (a deployed model is for
    inference; wrap it again if needed). BatchNorm is always folded with its running
    statistics, as in eval mode; a block still in training mode gets a warning, and each
    module keeps its mode (call ``.eval()`` on the result for inference).

    Args:
        model: any module.
        inplace: mutate ``model``; by default a deep copy is deployed and ``model`` is
            left untouched.
        unwrap: replace each deployed block of ours by its bare ``nn.ConvNd``, so the model
            holds only torch modules (no repsqueeze import needed to load its ``state_dict``
            or the whole pickled module: keys lose the block's ``.conv``, and what
            :func:`expand` attached for :func:`contract` is dropped), and no block's
            ``forward`` runs per call. A block used twice becomes one convolution used twice.

    Returns:
        The deployed model (``model`` itself when ``inplace``, unless a hook of ``model``
        itself returned a replacement; with ``unwrap``, the bare convolution when ``model`` is
        itself a block).
    """
    check_module("deploy", model)
    model = without_wrappers(model)
    _check_blocks(model)
    _warn_if_training(model)
    model = deploy_blocks(model, _top_blocks(model, "", set()), inplace)
    model = _deploy_tree(model, "")  # other libraries' blocks; ours are deployed already
    return _unwrap(model, {}) if unwrap else model


def _top_blocks(module: nn.Module, path: str, seen: set[int]) -> list[tuple[str, Squeezable]]:
    """``(path, block)`` of the outermost blocks of ours not deployed yet, in model order,
    each once (``seen``: the modules visited, so that a shared block is listed once)."""
    if id(module) in seen:
        return []
    seen.add(id(module))
    if isinstance(module, Squeezable):
        return [] if module.deployed else [(path, module)]
    found = []
    for name, child in module._modules.items():  # not named_children: shared ones too
        if child is not None:
            found += _top_blocks(child, f"{path}.{name}" if path else name, seen)
    return found


def _check_blocks(model: nn.Module) -> None:
    """Refuses, before anything is copied, hooks on layers inside blocks that deploying would
    ignore (old-style weight norms cannot even be deep-copied)."""
    for path, m in model.named_modules():
        if isinstance(m, Squeezable) and not m.deployed:
            try:
                check_inner_hooks(m, "deploy")
            except ValueError as err:
                raise ValueError(f"{path}: {err}" if path else str(err)) from err


TRAINING_WARNING = (
    "deploy: blocks in training mode are folded with their BatchNorm running statistics (as "
    "in eval mode), and the deployed model keeps each module's mode; call model.eval() first"
)


def _warn_if_training(model: nn.Module) -> None:
    """One warning when a block (ours, or one with a foreign hook) left to deploy trains."""
    for m in model.modules():
        if not m.training:
            continue
        if isinstance(m, Squeezable):
            pending = not m.deployed
        else:
            pending = any(is_hook(getattr(m, h, None)) for h in FOREIGN_HOOKS)
        if pending:
            warnings.warn(TRAINING_WARNING, UserWarning, stacklevel=4)  # deploy's caller
            return


def _unwrap(module: nn.Module, done: dict[int, nn.Module]) -> nn.Module:
    """``module`` with each deployed block replaced by its conv (``done``: what each module
    already visited became, so that a shared block becomes one shared conv)."""
    if id(module) in done:
        return done[id(module)]
    if isinstance(module, Squeezable):
        done[id(module)] = module.conv
        return module.conv
    done[id(module)] = module
    if isinstance(getattr(module, ORIGIN, None), Origin):
        delattr(module, ORIGIN)  # only contract() reads it, and it needs the blocks
    for name, child in list(module._modules.items()):  # not named_children: shared ones too
        if child is not None:
            bare = _unwrap(child, done)
            if bare is not child:
                setattr(module, name, bare)
    return module


def _deploy_tree(
    module: nn.Module, path: str, done: dict[int, nn.Module | None] | None = None
) -> nn.Module:
    """Deploys ``module`` and everything below it; returns what takes its place.

    ``path``: where ``module`` sits (prefixed to a block's error). ``done``: what each module
    visited became (``None`` while below it is deployed), so that a module used twice is
    deployed once and its replacement shared, and a replacement that wraps the old module
    does not run its hook again."""
    done = {} if done is None else done
    key = id(module)
    if done.get(key) is not None:
        return done[key]
    if isinstance(module, Squeezable):
        try:
            module.deploy()
        except ValueError as err:  # the block's message names layers inside it: add where it is
            raise ValueError(f"{path}: {err}" if path else str(err)) from err
        done[key] = module
        return module
    if key not in done:
        done[key] = None
        for hook in FOREIGN_HOOKS:
            method = getattr(module, hook, None)
            if is_hook(method):
                out = method()
                if isinstance(out, nn.Module):
                    module = out
                break
    for name, child in list(module._modules.items()):  # not named_children: shared ones too
        if child is not None:
            new = _deploy_tree(child, f"{path}.{name}" if path else name, done)
            if new is not child:
                setattr(module, name, new)
    done[key] = module
    return module
