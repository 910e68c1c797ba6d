"""The peers' training-form blocks on our networks, for like-for-like training benchmarks.

The official DBB, ACNet and OREPA blocks are loaded from fetched copies of their
repositories (:mod:`benchmarks.mirror`); a peer whose copy is absent is left out with a note. timm's RepVGG and MobileOne blocks come from the installed ``timm``.

Every peer block replaces each 3x3 :class:`~repsqueeze.ConvBN` of the network built with
``block="plain"`` (the 1x1 shortcuts stay), with no activation inside the block: the
network's own activations follow it, as they follow ours.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

import repsqueeze as rs
from benchmarks import mirror
from repsqueeze.models import create_model

MakeBlock = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride)

# label: (our block kind it compares with, repository, module, class)
OFFICIAL = {
    "official DBB (DingXiaoH/DiverseBranchBlock)": (
        "dbb", "DingXiaoH/DiverseBranchBlock", "diversebranchblock", "DiverseBranchBlock"
    ),
    "official OREPA (JUGGHM/OREPA_CVPR2022)": ("dbb", "JUGGHM/OREPA_CVPR2022", "blocks", "OREPA"),
    "official ACB (DingXiaoH/ACNet)": ("acb", "DingXiaoH/ACNet", "acnet.acb", "ACBlock"),
}  # fmt: skip


def with_blocks(model: nn.Module, make: MakeBlock) -> nn.Module:
    """``model`` with every 3x3 :class:`~repsqueeze.ConvBN` replaced by ``make(in, out,
    stride)``, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, rs.ConvBN):
            conv = module.layers[0]
            if conv.kernel_size == (3, 3):
                block = make(conv.in_channels, conv.out_channels, conv.stride[0])
                model.set_submodule(name, block)
    return model


def timm_blocks() -> dict[str, tuple[str, MakeBlock]]:
    """timm's training-form RepVGG and MobileOne blocks (``timm.models.byobnet``), with an
    identity in place of their own activation: label -> (our kind, builder); empty without
    timm."""
    try:
        from timm.models.byobnet import LayerFn, MobileOneBlock, RepVggBlock
    except ImportError:
        return {}
    layers = LayerFn(act=nn.Identity)
    return {
        "timm RepVggBlock": ("repvgg", lambda i, o, s: RepVggBlock(i, o, 3, s, layers=layers)),
        "timm MobileOneBlock": (
            "mobileone",
            lambda i, o, s: MobileOneBlock(i, o, 3, s, layers=layers),
        ),
    }


def official_blocks() -> tuple[dict[str, tuple[str, MakeBlock]], list[str]]:
    """The official blocks found (label -> (our kind, builder)) and a note for each one not
    found."""
    found, notes = {}, []
    for label, (kind, repo, module, name) in OFFICIAL.items():
        found_module = mirror.official_module(repo, module)
        if found_module is None:
            notes.append(f"{label}: left out, no copy at {mirror.where(repo)}")
            continue
        cls = getattr(found_module, name)
        found[label] = (kind, lambda i, o, s, cls=cls: cls(i, o, 3, stride=s, padding=1))
    return found, notes


def peer_variants(
    model_name: str, num_classes: int
) -> tuple[dict[str, dict[str, Callable[[], nn.Module]]], list[str]]:
    """Builders of ``model_name`` with each peer's blocks, grouped by the block kind of ours
    they compare with (kind -> label -> builder), and the notes of the peers left out."""
    official, notes = official_blocks()
    timm = timm_blocks()
    if not timm:
        notes.append("timm's blocks: left out, timm is not installed")
    variants: dict[str, dict[str, Callable[[], nn.Module]]] = {}
    for label, (kind, make) in {**official, **timm}.items():
        variants.setdefault(kind, {})[label] = lambda make=make: with_blocks(
            create_model(model_name, block="plain", num_classes=num_classes), make
        )
    return variants, notes
