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

import copy
import inspect
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core.blocks import Squeezable
from repsqueeze.interop import convert_official_state_dict
from repsqueeze.surgery import block_from_conv_bn, split_into
from repsqueeze.zoo import ACBlock, ConvBN, DiverseBranchBlock, ExpandedConv, MobileOneBlock

log = logging.getLogger("repsqueeze")

State = dict[str, Tensor]
HEAD = ("head.weight", "head.bias")
# block classes that take over a conv + BatchNorm exactly (their kind for block_from_conv_bn)
_KINDS = {ConvBN: "plain", ACBlock: "acb", DiverseBranchBlock: "dbb", MobileOneBlock: "mobileone"}
# kinds whose stem convolutions all read the input (in_channels adapts branch by branch)
_DIRECT = ("plain", "repvgg", "acb", "mobileone", "qarepvgg", "deployed")


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
def _timm():
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            "published weights load through timm, which is not installed: "
            "pip install 'repsqueeze[timm]'"
        ) from err
    return timm


def _from_timm(spec: str, overlay: Mapping[str, Any] | None) -> State:
    """The state dict of timm's ``spec`` (``model[.tag]``) with its pretrained weights."""
    timm = _timm()
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
    timm = _timm()
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


# --- key layouts -----------------------------------------------------------------------------
def _rename(state: State, rules: list[tuple[str, str]]) -> State:
    """Each key renamed by the first rule whose pattern matches it."""
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def _stage_minus_one(m: re.Match) -> str:
    return f"stages.{int(m.group(1)) - 1}.{m.group(2)}."


# timm byobnet block names -> the official RepVGG / MobileOne names; model paths -> official
_TIMM_BLOCK = [
    (r"\.conv_kxk\.(\d+)\.", r".rbr_conv.\1."),  # MobileOne
    (r"\.conv_kxk\.", ".rbr_dense."),  # RepVGG
    (r"\.conv_1x1\.", ".rbr_1x1."),
    (r"\.conv_scale\.", ".rbr_scale."),
    (r"\.attn\.fc1\.", ".se.reduce."),
    (r"\.attn\.fc2\.", ".se.expand."),
]
# torchvision / timm ResNet -> the DBB ResNet's names
_TORCHVISION = [
    (r"^conv1\.weight$", "stage0.conv1.conv.weight"),
    (r"^bn1\.", "stage0.conv1.bn."),
    (r"^layer(\d)\.(\d+)\.conv(\d)\.", r"stage\1.\2.conv\3.conv."),
    (r"^layer(\d)\.(\d+)\.bn(\d)\.", r"stage\1.\2.conv\3.bn."),
    (r"^layer(\d)\.(\d+)\.downsample\.0\.", r"stage\1.\2.shortcut.conv."),
    (r"^layer(\d)\.(\d+)\.downsample\.1\.", r"stage\1.\2.shortcut.bn."),
    (r"^fc\.", "linear."),
]


def _from_timm_byobnet(state: State) -> State:
    repvgg = any(".conv_kxk.conv." in f".{k}" for k in state)
    skip, deployed = ("rbr_identity", "rbr_reparam") if repvgg else ("rbr_skip", "reparam_conv")
    rules = [(p, r) for p, r in _TIMM_BLOCK]
    rules += [(r"\.identity\.", f".{skip}."), (r"\.reparam_conv\.", f".{deployed}.")]
    out = {}
    for key, value in state.items():
        key = "." + key
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        key = key[1:]
        key = re.sub(r"^stem\.", "stage0.", key)
        key = re.sub(r"^stages\.(\d+)\.", lambda m: f"stage{int(m.group(1)) + 1}.", key)
        key = re.sub(r"^head\.fc\.", "linear.", key)
        out[key] = value
    return out


def _official_plain(state: State) -> State:
    """RepVGG / QARepVGG / MobileOne official paths -> ours (after the block renames)."""
    return _rename(
        state,
        [
            (r"^stage0\.se\.(down|reduce)\.", "stem.0.1.reduce."),
            (r"^stage0\.se\.(up|expand)\.", "stem.0.1.expand."),
            (r"^stage0\.", "stem.0.0."),
            (
                r"^stage(\d+)\.(\d+)\.se\.(down|reduce)\.",
                lambda m: _stage_minus_one(m) + "1.reduce.",
            ),  # fmt: skip
            (
                r"^stage(\d+)\.(\d+)\.se\.(up|expand)\.",
                lambda m: _stage_minus_one(m) + "1.expand.",
            ),  # fmt: skip
            (r"^stage(\d+)\.(\d+)\.", lambda m: _stage_minus_one(m) + "0."),
            (r"^linear\.", "head."),
        ],
    )


def _official_resnet(state: State) -> State:
    """DBB / ACNet ResNet paths -> ours (after the block renames); its ConvBNs -> ours."""
    bottleneck = any(re.match(r"^stage\d\.\d+\.conv3\.", k) for k in state)
    wrapped = "(conv1|conv2)" if bottleneck else "(conv1)"  # followed by an activation
    state = _rename(
        state,
        [
            (r"^stage0\.conv1\.", "stem.0.0."),
            (
                rf"^stage(\d+)\.(\d+)\.{wrapped}\.",
                lambda m: f"{_stage_minus_one(m)}{m.group(3)}.0.",
            ),  # fmt: skip
            (r"^stage(\d+)\.(\d+)\.", _stage_minus_one),
            (r"^linear\.", "head."),
        ],
    )
    convbn = {k[: -len("bn.running_mean")] for k in state if k.endswith(".bn.running_mean")}
    out = {}
    for key, value in state.items():
        for prefix in convbn:
            if key.startswith(prefix + "conv."):
                key = prefix + "layers.0." + key[len(prefix + "conv.") :]
            elif key.startswith(prefix + "bn."):
                key = prefix + "layers.1." + key[len(prefix + "bn.") :]
        out[key] = value
    return out


_MARKERS = [  # (substring of a key, block kind), the first found wins
    (".rbr_1x1.weight", "qarepvgg"),
    (".rbr_dense.", "repvgg"),
    (".rbr_conv.", "mobileone"),
    (".dbb_origin.", "dbb"),
    (".square_conv.", "acb"),
]


def _official_kind(state: State) -> str:
    for marker, kind in _MARKERS:
        if any(marker in "." + k for k in state):
            return kind
    if any(
        re.search(r"(rbr_reparam|reparam_conv|dbb_reparam|fused_conv)\.weight$", k) for k in state
    ):
        return "deployed"
    if any(k.endswith(".bn.running_mean") for k in state):
        return "plain"  # a DBB / ACNet ResNet with plain conv-BN ('base')
    return "deployed"


def recognise(state: State) -> tuple[str, State, str | None]:
    """``(layout, state dict in our paths, block kind of the file or None for ours)``.

    Raises:
        ValueError: a layout none of the known ones.
    """
    keys = set(state)
    if any(k.startswith("stem.0.") for k in keys):
        return "repsqueeze", state, None
    if any(k.startswith(("stem.conv_kxk.", "stem.reparam_conv.")) for k in keys):
        official = _from_timm_byobnet(state)
        kind = _official_kind(official)
        return "timm byobnet", _official_plain(_convert(official, kind)), kind
    if "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys):
        official = _rename(state, _TORCHVISION)
        return "torchvision resnet", _official_resnet(official), "plain"
    if any(k.startswith("stage0.conv1.") for k in keys):
        kind = _official_kind(state)
        return f"official {kind} resnet", _official_resnet(_convert(state, kind)), kind
    if any(k.startswith("stage0.") for k in keys):
        kind = _official_kind(state)
        return f"official {kind}", _official_plain(_convert(state, kind)), kind
    first = ", ".join(sorted(keys)[:3])
    raise ValueError(
        f"the key layout is not one repsqueeze knows (first keys: {first}); known: "
        "repsqueeze's own, timm's byobnet RepVGG / MobileOne and ResNet, torchvision's "
        "ResNet, the official RepVGG / QARepVGG / MobileOne / DBB / ACNet"
    )


def _convert(state: State, kind: str) -> State:
    if kind == "plain":
        return state
    return convert_official_state_dict(state, None if kind == "deployed" else kind)


# --- loading ---------------------------------------------------------------------------------
def _layout(state: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _mismatch(have: Mapping[str, tuple], want: Mapping[str, tuple], skip=()) -> str | None:
    """One line naming the first missing, unexpected and mis-shaped keys, or ``None``."""
    missing = [k for k in want if k not in have and k not in skip]
    extra = [k for k in have if k not in want and k not in skip]
    shapes = [k for k in want if k in have and k not in skip and have[k] != want[k]]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else ""))  # fmt: skip
    if extra:
        parts.append(f"unexpected {', '.join(extra[:3])}" + (f" (+{len(extra) - 3})" if len(extra) > 3 else ""))  # fmt: skip
    for k in shapes[:3]:
        parts.append(f"{k} is {list(have[k])} in the file, {list(want[k])} in the model")
    return "; ".join(parts) or None


def _blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level squeezable blocks by path (none nested in another)."""
    out: dict[str, nn.Module] = {}
    for path, m in model.named_modules():
        if isinstance(m, Squeezable) and not any(path.startswith(p + ".") for p in out):
            out[path] = m
    return out


def _sub(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def _arch_kwargs(name: str, kwargs: Mapping[str, Any]) -> tuple[dict, dict, str]:
    """Splits create_model's kwargs into the architecture's and the blocks'; the block kind."""
    from repsqueeze.models.registry import _MODELS

    fn = _MODELS[name]
    own = set(inspect.signature(fn).parameters)
    cls = inspect.signature(fn, eval_str=True).return_annotation
    default = "repvgg"
    if inspect.isclass(cls):
        params = inspect.signature(cls).parameters
        own |= set(params)
        if "block" in params and params["block"].default is not inspect.Parameter.empty:
            default = params["block"].default
    if "block" in inspect.signature(fn).parameters:
        default = inspect.signature(fn).parameters["block"].default
    arch = {k: v for k, v in kwargs.items() if k in own}
    block = {k: v for k, v in kwargs.items() if k not in own}
    return arch, block, arch.get("block", default)


def _meta_model(name: str, **kwargs) -> nn.Module:
    from repsqueeze.models.registry import _MODELS

    with torch.device("meta"):
        return _MODELS[name](**kwargs)


def _own_kind(name: str, arch: dict, state: State, hint: dict | None) -> tuple[str, dict]:
    """The block kind (and block kwargs) of a repsqueeze state dict: the checkpoint's
    ``net_config`` when it has one, else the kind whose network has exactly these keys."""
    from repsqueeze.zoo import BLOCKS

    tried = []
    if hint is not None:
        _, hinted, kind = _arch_kwargs(name, hint)
        hinted = {k: v for k, v in hinted.items() if k not in ("name", "pretrained", "deployed")}
        tried.append((kind, {"block": kind, **hinted}))
    have = _layout(state)
    base = {k: v for k, v in arch.items() if k not in ("block", "deployed", "num_classes")}
    base["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    tried += [(k, {"block": k}) for k in BLOCKS]
    tried += [(f"{k} (online_norm)", {"block": k, "online_norm": True}) for k in BLOCKS]
    for kind, extra in tried:
        try:
            model = _meta_model(name, **base, **extra)
        except (TypeError, ValueError):
            continue
        want = _layout(model.state_dict())
        if _mismatch(have, want, skip=HEAD) is None:
            return kind, {k: v for k, v in extra.items() if k not in ("block", "deployed")}
    raise ValueError(
        f"the file has repsqueeze's key layout but fits {name} with no block kind (deployed "
        "or training form); it was saved from another architecture or with other arguments"
    )


def _input_channels(state: Mapping[str, Tensor], first: str | None) -> int | None:
    """Input channels of a network: the fewest of its first block's convolutions read (a
    branch reads the input; a chain's inner layers are at least as wide)."""
    if first is None:
        return None
    ins = [v.shape[1] for k, v in state.items() if k.startswith(first + ".") and v.dim() == 4]
    return min(ins) if ins else None


def _adapt_stem(state: State, first: str, kind: str, src_in: int, in_channels: int) -> list[str]:
    """Adapts the first block's convolutions from ``src_in`` to ``in_channels`` input
    channels with timm's ``adapt_input_conv`` (in place); returns the keys adapted."""
    if kind.split(" ")[0] not in _DIRECT:
        raise ValueError(
            f"in_channels={in_channels}: the file's first block ({kind}) has convolutions "
            "that do not read the input; adapt a deployed or RepVGG / MobileOne / ACNet "
            "checkpoint instead"
        )
    _timm()
    from timm.models import adapt_input_conv

    keys = [
        k for k, v in state.items()
        if k.startswith(first + ".") and v.dim() == 4 and v.shape[1] == src_in
    ]  # fmt: skip
    for k in keys:
        state[k] = adapt_input_conv(in_channels, state[k].float()).to(state[k].dtype)
    return keys


@torch.no_grad()
def _carry(src: nn.Module, dst: nn.Module, kind: str | None, kwargs: dict) -> dict[str, Tensor]:
    """The state of ``dst`` that computes what ``src`` computes (eval mode): the deployed
    convolution, or ``kind``'s ``from_conv_bn`` of ``src`` split into conv + BatchNorm."""
    dtype = next(iter(dst.state_dict().values())).dtype
    squeezed = copy.deepcopy(src).double().squeeze()
    if dst.deployed:
        return {"conv.weight": squeezed.weight.to(dtype), "conv.bias": squeezed.bias.to(dtype)}
    if kind is None:
        raise ValueError(
            f"a {type(dst).__name__} cannot start from another block's weights exactly; load "
            "a checkpoint of the same block kind, or build the model with another kind"
        )
    like = next((m for m in src.modules() if isinstance(m, _BatchNorm)), None)
    if like is None:  # deployed: unit statistics
        like = nn.BatchNorm2d(squeezed.out_channels).eval().double()
    conv = type(squeezed)(
        squeezed.in_channels, squeezed.out_channels, squeezed.kernel_size, squeezed.stride,
        squeezed.padding, squeezed.dilation, squeezed.groups, bias=False,
        padding_mode=squeezed.padding_mode,
    ).double()  # fmt: skip
    bn = nn.BatchNorm2d(squeezed.out_channels, eps=like.eps, momentum=like.momentum).double()
    split_into(squeezed.weight, squeezed.bias, like, conv, bn)
    kwargs = _accepted(kind, kwargs)
    if type(dst) is MobileOneBlock:
        k = dst.branches[0][0].kernel_size
        kwargs = {"num_conv_branches": sum(1 for b in dst.branches if isinstance(b, nn.Sequential) and b[0].kernel_size == k), **kwargs}  # fmt: skip
    new = block_from_conv_bn(kind, conv, bn, **kwargs)
    return {k: v.to(dtype) for k, v in new.state_dict().items()}


def _accepted(kind: str, kwargs: dict) -> dict:
    """The arguments of ``kwargs`` that blocks of ``kind`` take."""
    from repsqueeze.zoo import BLOCKS

    params = inspect.signature(BLOCKS[kind]).parameters
    return {k: v for k, v in kwargs.items() if k in params and k != "deployed"}


def _dst_kind(block: nn.Module, kind: str) -> str | None:
    if isinstance(block, ExpandedConv):
        return kind if kind.startswith("expand_") else None
    if type(block) in _KINDS:
        return _KINDS[type(block)]
    from repsqueeze.zoo import RepVGGBlock

    return "repvgg" if type(block) is RepVGGBlock else None


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
    arch, block_kwargs, target_kind = _arch_kwargs(name, kwargs)
    target = model.state_dict()
    blocks = _blocks(model)
    first = next(iter(blocks), None)
    in_channels, src_in = _input_channels(target, first), _input_channels(state, first)
    if kind is None and first is not None and set(_sub(state, first)) == {"conv.weight", "conv.bias"}:  # fmt: skip
        kind = "deployed"
    if src_in is not None and in_channels is not None and src_in != in_channels:
        adapted = _adapt_stem(state, first, kind or target_kind, src_in, in_channels)
    else:
        adapted = []
    head_fits = all(k in state for k in HEAD) and all(
        k in target and state[k].shape == target[k].shape for k in HEAD
    )
    reinit = [] if head_fits else [k for k in HEAD if k in target]
    dropped = [] if head_fits else [k for k in HEAD if k in state and k not in target]
    out = {k: v for k, v in state.items() if head_fits or k not in HEAD}
    converted: list[str] = []
    if _mismatch(_layout(out), _layout(target), skip=reinit) is not None:
        if kind is None:
            kind, src_kwargs = _own_kind(name, arch, state, hint)
        else:
            src_kwargs = _official_kwargs(kind, state, list(blocks))
        out, converted = _through_source(model, name, state, kind, layout, arch, src_kwargs,
                                         block_kwargs, target_kind, in_channels)  # fmt: skip
        out = {k: v for k, v in out.items() if head_fits or k not in HEAD}
    elif kind is None:
        kind = "deployed" if getattr(blocks.get(first), "deployed", False) else target_kind
    problem = _mismatch(_layout(out), _layout(target), skip=reinit)
    if problem:
        raise ValueError(f"the {layout} file ({kind}) does not fit {name}: {problem}")
    model.load_state_dict(out, strict=False)
    report = LoadReport(where, layout, kind.replace(" (online_norm)", ", online_norm"))
    report.loaded = [k for k in target if k in out]
    report.converted, report.adapted = converted, adapted
    report.reinitialised, report.dropped = reinit, dropped
    log.info(report.summary())
    return report


def _official_kwargs(kind: str, state: State, paths: list[str]) -> dict:
    """Block arguments the file's blocks need: MobileOne's number of k x k branches (read
    from the first block after the stem, which has one)."""
    if kind != "mobileone" or len(paths) < 2:
        return {}
    pattern = re.compile(rf"^{re.escape(paths[1])}\.branches\.(\d+)\.0\.weight$")
    branches = {m.group(1) for k, v in state.items() if (m := pattern.match(k)) and v.shape[-1] > 1}
    return {"num_conv_branches": max(len(branches), 1)}


def _through_source(
    model, name, state, kind, layout, arch, src_kwargs, block_kwargs, target_kind, in_channels
) -> tuple[State, list[str]]:
    """The file's network built with its own kind, then carried block by block into
    ``model``'s kinds and form; returns the state for ``model`` and the carried blocks."""
    classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    args = _source_args(arch, kind, src_kwargs, classes, in_channels)
    source = _meta_model(name, **args)
    problem = _mismatch(_layout(state), _layout(source.state_dict()))
    if problem:
        raise ValueError(f"the {layout} file ({kind}) does not fit {name}: {problem}")
    source.load_state_dict(state, strict=True, assign=True)
    source.eval()
    target = model.state_dict()
    out = dict(state)
    converted = []
    src_blocks = _blocks(source)
    for path, dst in _blocks(model).items():
        mine, theirs = _sub(target, path), _sub(state, path)
        if _layout(mine) == _layout(theirs):
            continue
        carried = _carry(src_blocks[path], dst, _dst_kind(dst, target_kind), block_kwargs)
        if _layout(carried) != _layout(mine):
            problem = _mismatch(_layout(carried), _layout(mine))
            raise ValueError(f"{path}: the carried-over block does not fit: {problem}")
        for k in theirs:
            del out[f"{path}.{k}"]
        out.update({f"{path}.{k}": v for k, v in carried.items()})
        converted.append(path)
    return out, converted


def _source_args(arch: dict, kind: str, src_kwargs: dict, classes: int, in_channels) -> dict:
    """Arguments that build the file's network: the architecture's, the file's kind."""
    args = {k: v for k, v in arch.items() if k not in ("block", "deployed", "num_classes")}
    args["num_classes"] = classes
    if in_channels is not None:
        args["in_channels"] = in_channels
    elif "in_channels" in args:
        del args["in_channels"]
    base = kind.split(" ")[0]
    if base == "deployed":
        return {**args, "deployed": True}
    return {**args, "block": base, **src_kwargs}
