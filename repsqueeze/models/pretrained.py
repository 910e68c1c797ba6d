"""Published and saved weights into registered models: ``create_model(name, pretrained=...)``.

A source is ``True`` (the architecture's default published weights, through timm), a tag
``"timm:<model>[.<tag>]"`` (timm's own pretrained loading: its hub where there is network,
``pretrained_cfg_overlay={"file": PATH}`` for a local file), a file path, or a state dict.
The key layout of a file is recognised from its keys:

* repsqueeze's own (a ``state_dict`` of the model, a Lightning checkpoint of
  :class:`repsqueeze.training.lit.Classifier`, ``save_deployed``'s file), training form of any block
  kind or deployed;
* timm's byobnet RepVGG / MobileOne (``stem.conv_kxk``, ``stages.i.j``, ``head.fc``) and
  timm's / torchvision's ResNet (``conv1``, ``layer1.0``, ``fc``);
* the official repositories: RepVGG (all variants, groupwise and SE), QARepVGG (a bare
  ``rbr_1x1`` conv and a trailing ``bn``) and MobileOne (with SE): ``stage0``,
  ``stageK.N``, ``linear``; the DBB / ACNet ResNets (``stage0.conv1``, ``stageK.N.convJ``,
  ``shortcut``), training form or deployed.

The file's blocks become a network of the same architecture built with the file's block kind
(:func:`repsqueeze.interop.convert_official_state_dict` renames each official block); each
of its blocks then goes into the requested model: as it is when the kinds match, else
through its function (squeezed into one convolution, then that kind's ``from_conv_bn``, or
the deployed convolution), so the loaded network computes what the file's network computes.
A head of another size is re-initialised; another input channel count adapts the stem with
timm's ``adapt_input_conv``. Any other difference is refused with one line naming the keys
and their shapes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repsqueeze.models.carry import (
    HEAD,
    adapt_stem,
    arch_kwargs,
    blocks_of,
    import_timm,
    input_channels,
    layout_of,
    mismatch,
    official_kwargs,
    own_kind,
    sub_state,
    through_source,
)
from repsqueeze.models.layouts import State, recognise

log = logging.getLogger("repsqueeze")
_DEPLOYED = {"conv.weight", "conv.bias"}  # the keys of a deployed block


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        source: the file, tag or ``"<state dict>"``.
        layout: the key layout recognised (``"repsqueeze"``, ``"timm byobnet"``, ...).
        kind: the block kind of the file's blocks, or ``"deployed"``.
        loaded: keys of the model set from the file.
        converted: blocks (paths) whose weights came through their function (another block
            kind or form than the file's).
        adapted: keys adapted to another number of input channels.
        reinitialised: keys left at their fresh initialisation (a head of another size).
        dropped: keys of the file the model has no place for (a head when it has none).
    """

    source: str
    layout: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: source, layout, and how many keys were loaded / re-initialised."""
        parts = [f"{len(self.loaded)} keys loaded"]
        if self.converted:
            parts.append(f"{len(self.converted)} blocks carried over through their function")
        if self.adapted:
            parts.append(f"input channels adapted in {', '.join(self.adapted)}")
        if self.reinitialised:
            parts.append(f"re-initialised: {', '.join(self.reinitialised)}")
        if self.dropped:
            parts.append(f"not used: {', '.join(self.dropped)}")
        return f"pretrained {self.source} ({self.layout}, {self.kind}): " + "; ".join(parts)


# --- reading a source ------------------------------------------------------------------------
def _from_timm(spec: str, overlay: Mapping[str, Any] | None) -> State:
    """The state dict of timm's ``spec`` (``model[.tag]``) with its pretrained weights."""
    timm = import_timm()
    arch, _, tag = spec.partition(".")
    if not timm.is_model(arch):
        raise ValueError(f"pretrained='timm:{spec}': timm has no model {arch!r}")
    cfg = timm.models.get_pretrained_cfg(spec if tag else arch)
    if cfg is None:
        raise ValueError(f"pretrained='timm:{spec}': timm has no pretrained tag {spec!r}")
    full = f"{arch}.{cfg.tag}" if cfg.tag else arch
    try:
        model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay=dict(overlay or {}))
    except Exception as err:  # hub, network and file errors alike
        reason = " ".join(str(err).split())[:200]
        raise OSError(
            f"pretrained='timm:{full}': timm could not load its weights ({type(err).__name__}: "
            f"{reason}); without network, download them and pass "
            f"pretrained_cfg_overlay={{'file': PATH}} with pretrained='timm:{full}', or "
            "pretrained=PATH"
        ) from err
    return {k: v for k, v in model.state_dict().items()}


def _default_tag(name: str) -> str:
    """The timm model whose default weights ``pretrained=True`` means for ``name``."""
    timm = import_timm()
    if not timm.is_model(name) or timm.models.get_pretrained_cfg(name) is None:
        raise ValueError(
            f"{name}: no published weights are known for it (pretrained=True means timm's "
            "default weights of the same architecture); pass pretrained=PATH (a checkpoint "
            "file) or pretrained='timm:<model>.<tag>'"
        )
    return name


def _read_file(path: Path) -> tuple[State, dict | None]:
    """The state dict in a file and, for a Lightning checkpoint, its ``net_config``."""
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained={str(path)!r}: no such file (give a checkpoint path, True, or "
            "'timm:<model>.<tag>')"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = " ".join(str(err).split())[:200]
        raise ValueError(
            f"pretrained={str(path)!r}: not a PyTorch weights file ({reason})"
        ) from err
    return _unwrap(obj, str(path))


def _unwrap(obj: Any, where: str) -> tuple[State, dict | None]:
    config = None
    if isinstance(obj, Mapping):
        hparams = obj.get("hyper_parameters") or {}
        config = hparams.get("net_config") or obj.get("net_config")
        for key in ("state_dict", "model", "state_dict_ema", "model_ema", "net"):
            if isinstance(obj.get(key), Mapping) and obj[key]:
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"pretrained={where!r}: holds no state dict (a mapping of names to tensors)"
        )
    state = dict(obj)
    for prefix in ("net.", "module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, dict(config) if isinstance(config, Mapping) else None


def load_pretrained(
    model: nn.Module,
    source: bool | str | os.PathLike | Mapping[str, Tensor],
    name: str,
    kwargs: Mapping[str, Any] | None = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
) -> LoadReport:
    """Loads weights into ``model`` (built by ``create_model(name, **kwargs)``), in place.

    Args:
        model: the freshly built model.
        source: ``True``, ``"timm:<model>[.<tag>]"``, a file path or a state dict (see the
            module docstring).
        name: the registered name ``model`` was built from.
        kwargs: the arguments it was built with.
        pretrained_cfg_overlay: timm's overlay of the pretrained config, e.g.
            ``{"file": PATH}`` to read timm's weights from a local file.

    Returns:
        A :class:`LoadReport`; its :meth:`~LoadReport.summary` is also logged.

    Raises:
        FileNotFoundError: no such file.
        OSError: timm could not fetch the weights (no network, no such file).
        ValueError: an unknown layout, or a file that does not fit the model (one line
            naming keys and shapes).
    """
    kwargs = dict(kwargs or {})
    hint = None
    if source is True or (isinstance(source, str) and source.startswith("timm:")):
        spec = _default_tag(name) if source is True else source[len("timm:") :]
        state = _from_timm(spec, pretrained_cfg_overlay)
        where = f"timm:{spec}" if source is not True else f"timm:{spec} (default)"
    elif isinstance(source, Mapping):
        state, hint = _unwrap(source, "<state dict>")
        where = "<state dict>"
    elif isinstance(source, str | os.PathLike):
        state, hint = _read_file(Path(source))
        where = str(source)
    else:
        raise ValueError(
            f"pretrained must be False, True, 'timm:<model>.<tag>', a file path or a state "
            f"dict, got {source!r}"
        )
    try:
        return _load(model, state, name, kwargs, hint, where)
    except ValueError as err:
        raise ValueError(f"{name}: pretrained={where!r}: {err}") from err


def _load(model, state, name, kwargs, hint, where) -> LoadReport:
    layout, state, kind = recognise(state)
    arch, block_kwargs, target_kind = arch_kwargs(name, kwargs)
    target = model.state_dict()
    blocks = blocks_of(model)
    first = next(iter(blocks), None)
    in_channels, src_in = input_channels(target, first), input_channels(state, first)
    if kind is None and first is not None and set(sub_state(state, first)) == _DEPLOYED:
        kind = "deployed"
    if src_in is not None and in_channels is not None and src_in != in_channels:
        adapted = adapt_stem(state, first, kind or target_kind, src_in, in_channels)
    else:
        adapted = []
    head_fits = all(k in state for k in HEAD) and all(
        k in target and state[k].shape == target[k].shape for k in HEAD
    )
    reinit = [] if head_fits else [k for k in HEAD if k in target]
    dropped = [] if head_fits else [k for k in HEAD if k in state and k not in target]
    out = {k: v for k, v in state.items() if head_fits or k not in HEAD}
    converted: list[str] = []
    if mismatch(layout_of(out), layout_of(target), skip=reinit) is not None:
        if kind is None:
            kind, src_kwargs = own_kind(name, arch, state, hint)
        else:
            src_kwargs = official_kwargs(kind, state, list(blocks))
        source = (kind, layout, src_kwargs)
        target_args = (arch, block_kwargs, target_kind, in_channels)
        out, converted = through_source(model, name, state, source, target_args)
        out = {k: v for k, v in out.items() if head_fits or k not in HEAD}
    elif kind is None:
        kind = "deployed" if getattr(blocks.get(first), "deployed", False) else target_kind
    problem = mismatch(layout_of(out), layout_of(target), skip=reinit)
    if problem:
        raise ValueError(f"the {layout} file ({kind}) does not fit {name}: {problem}")
    model.load_state_dict(out, strict=False)
    report = LoadReport(where, layout, kind.replace(" (online_norm)", ", online_norm"))
    report.loaded = [k for k in target if k in out]
    report.converted, report.adapted = converted, adapted
    report.reinitialised, report.dropped = reinit, dropped
    log.info(report.summary())
    return report
