"""What :func:`~repsqueeze.surgery.expand` replaced, kept for
:func:`~repsqueeze.surgery.contract`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(eq=False)
class Origin:
    """What :func:`expand` replaced, for :func:`contract`: the conv and the norm as modules
    on the ``meta`` device (types and attributes, no weights). The block and the module
    left in the norm's place hold the same ``Origin`` (attribute ``ORIGIN``)."""

    conv: nn.Module
    norm: nn.Module


ORIGIN = "repsqueeze_origin"
