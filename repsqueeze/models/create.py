"""``create_model(name, **kwargs)``: a registered model, optionally with published or saved
weights, optionally as a feature extractor, as in timm."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from repsqueeze.models.layers import FeatureNet
from repsqueeze.models.pretrained import load_pretrained
from repsqueeze.models.registry import build_model, get_model


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike | Mapping = False,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds a registered model, optionally from published or saved weights, as in timm.

    Args:
        name: a name from :func:`list_models`.
        pretrained: ``False`` (fresh initialisation); ``True`` (the architecture's default
            published weights, through timm); ``"timm:<model>[.<tag>]"`` (those of a timm
            model and tag); a file path (repsqueeze's own checkpoint or state dict, timm's,
            or an official RepVGG / QARepVGG / MobileOne / DBB / ACNet one, training form or
            deployed, recognised from its keys); or a state dict. Another ``num_classes``
            re-initialises the head, another ``in_channels`` adapts the stem
            (timm's ``adapt_input_conv``); see :mod:`repsqueeze.models.pretrained`. What was
            loaded is logged and kept in the model's ``pretrained_report``.
        features_only: return a :class:`~repsqueeze.models.layers.FeatureNet`: the feature
            maps of ``out_indices`` instead of logits.
        out_indices: feature levels for ``features_only`` (0: the stem, ``i``: stage ``i``;
            default all).
        pretrained_cfg_overlay: passed to timm with a ``timm:`` or ``True`` source, e.g.
            ``{"file": PATH}`` to read timm's weights from a local file.
        **kwargs: arguments of the model's constructor (``block``: a kind's name or a
            :class:`~repsqueeze.zoo.BlockFactory`, ``num_classes``, ``in_channels``,
            ``deployed``, ...) and of its blocks (``norm_layer``, ``mode``, ...), which are
            bound into the model's block factory.

    Raises:
        ValueError: an unknown name or block kind, ``num_classes`` / ``in_channels`` not a
            positive integer, weights that do not fit (one line naming keys and shapes), or
            ``features_only`` for a model without feature levels.
        TypeError: an argument that neither the model nor its blocks take; the message
            names the model and the arguments it takes (read from the signatures).
        FileNotFoundError, OSError, ImportError: a missing file, weights timm could not
            fetch, timm not installed (``pip install 'repsqueeze[timm]'``).
    """
    get_model(name)
    for arg in ("num_classes", "in_channels"):
        value = kwargs.get(arg, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
    model = build_model(name, **kwargs)
    if pretrained is not False and pretrained is not None:
        report = load_pretrained(model, pretrained, name, kwargs, pretrained_cfg_overlay)
        model.__dict__["pretrained_report"] = report
    if features_only:
        info = getattr(model, "feature_info", None)
        if info is None:
            raise ValueError(f"{name}: features_only needs a model with feature_info levels")
        model = FeatureNet(model, range(len(info)) if out_indices is None else out_indices)
    return model
