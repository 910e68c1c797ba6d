"""Key layouts of published and saved weights, recognised from their keys and renamed to
repsqueeze's paths: repsqueeze's own, timm's byobnet RepVGG / MobileOne, timm's and
torchvision's ResNet, and the official RepVGG / QARepVGG / MobileOne / DBB / ACNet code.
"""

from __future__ import annotations

import re

from torch import Tensor

from repsqueeze.interop import convert_official_state_dict

State = dict[str, Tensor]


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
            ),
            (
                r"^stage(\d+)\.(\d+)\.se\.(up|expand)\.",
                lambda m: _stage_minus_one(m) + "1.expand.",
            ),
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
            ),
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
