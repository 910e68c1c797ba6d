"""What other code brings into a model: wrappers (DDP, DataParallel, ``torch.compile``) and
blocks of other libraries that switch themselves to a deployed form."""

from __future__ import annotations

import inspect
import sys

from torch import nn

from repsqueeze.core import primitives
from repsqueeze.core.blocks import Squeezable

# Method names other libraries use for "switch this block to its deployed form":
# timm/MobileOne ``reparameterize``, RepVGG/DBB/ACNet ``switch_to_deploy``, YOLO-style ``fuse``.
FOREIGN_HOOKS = ("reparameterize", "switch_to_deploy", "fuse")


def check_module(what: str, model: object) -> None:
    """Refuses anything but an ``nn.Module``, naming the pass ``what``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")


def wrappers() -> list[tuple[type, str]]:
    """``(class, attribute holding the wrapped module)`` of DDP, DataParallel, compile."""
    wrappers = [(nn.parallel.DistributedDataParallel, "module"), (nn.DataParallel, "module")]
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # no compiled module without it
    if dynamo is not None:
        wrappers.append((dynamo.OptimizedModule, "_orig_mod"))
    return wrappers


def without_wrappers(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / ``torch.compile`` wrappers, nested or not."""
    while True:
        attr = next((a for cls, a in wrappers() if isinstance(model, cls)), None)
        if attr is None:
            return model
        model = getattr(model, attr)


def is_hook(method) -> bool:
    """A method (not a child module named like one) that takes no required argument."""
    if not callable(method) or isinstance(method, nn.Module):
        return False
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # no signature (a builtin): do not guess
        return False
    return all(
        p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params
    )


FOREIGN_REASON = (
    "which re-parameterizes itself (reparameterize() / switch_to_deploy() / fuse()) from the "
    "layers it built, so a block in their place would break it; convert timm's RepVGG / "
    "MobileOne blocks with rs.from_timm instead"
)


def self_deploying_owner(model: nn.Module, path: str) -> str | None:
    """The innermost module above ``path`` (the model included) that is not a block of ours
    and has a method of :data:`FOREIGN_HOOKS`, as ``path (Class)``; ``None`` if none."""
    owner, module, names = None, model, path.split(".")
    for depth, name in enumerate(names):
        if not isinstance(module, Squeezable) and any(
            is_hook(getattr(module, h, None)) for h in FOREIGN_HOOKS
        ):
            owner = primitives.name_of(module, ".".join(names[:depth]) or "<model>")
        module = getattr(module, name)
    return owner
