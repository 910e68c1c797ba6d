"""The peers' training-form blocks on our networks, for like-for-like training benchmarks.

The official DBB, ACNet and OREPA blocks are loaded from copies of their repositories
fetched beside this one (bare git mirrors, by default under ``/work/.mirror``, or the folder
named by ``REPSQUEEZE_MIRROR``: ``<owner>+<name>/repo``); their code is read from there at
benchmark time and never copied into this repository. A peer whose copy is absent is left
out with a note. timm's RepVGG and MobileOne blocks come from the installed ``timm``.

Every peer block replaces each 3x3 :class:`~repsqueeze.ConvBN` of the network built with
``block="plain"`` (the 1x1 shortcuts stay), with no activation inside the block: the
network's own activations follow it, as they follow ours.
"""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

import repsqueeze as rs
from repsqueeze.models import create_model

MIRROR = Path(os.environ.get("REPSQUEEZE_MIRROR", "/work/.mirror"))
MakeBlock = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride)
_COPIES: list[tempfile.TemporaryDirectory] = []  # the extracted sources, kept while running

# label: (our block kind it compares with, repository, module, class)
OFFICIAL = {
    "official DBB (DingXiaoH/DiverseBranchBlock)": (
        "dbb", "DingXiaoH/DiverseBranchBlock", "diversebranchblock", "DiverseBranchBlock"
    ),
    "official OREPA (JUGGHM/OREPA_CVPR2022)": ("dbb", "JUGGHM/OREPA_CVPR2022", "blocks", "OREPA"),
    "official ACB (DingXiaoH/ACNet)": ("acb", "DingXiaoH/ACNet", "acnet.acb", "ACBlock"),
}  # fmt: skip


def official_class(repo: str, module: str, name: str) -> type | None:
    """Class ``name`` of ``module`` in the fetched copy of ``repo``; ``None`` without one.

    The copy's files are extracted to a temporary folder and imported from there; the
    modules it loaded are dropped from ``sys.modules`` afterwards (the repositories share
    top-level module names such as ``dbb_transforms`` and ``convnet_utils``).
    """
    git_dir = MIRROR / repo.replace("/", "+") / "repo"
    if not git_dir.is_dir():
        return None
    archive = subprocess.run(
        ["git", "--git-dir", str(git_dir), "archive", "HEAD"], capture_output=True, check=True
    ).stdout
    copy = tempfile.TemporaryDirectory(prefix="repsqueeze-peer-")
    _COPIES.append(copy)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(copy.name, filter="data")
    sys.path.insert(0, copy.name)
    try:
        return getattr(importlib.import_module(module), name)
    finally:
        sys.path.remove(copy.name)
        for key, mod in list(sys.modules.items()):
            if str(getattr(mod, "__file__", "") or "").startswith(copy.name):
                del sys.modules[key]


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
        cls = official_class(repo, module, name)
        if cls is None:
            notes.append(f"{label}: left out, no copy at {MIRROR / repo.replace('/', '+')}")
            continue
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
