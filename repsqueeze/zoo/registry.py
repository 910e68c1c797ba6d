"""The block registry: every block kind by name, and factories that build blocks of a kind.

``register_block(name)`` adds a kind (as a decorator or a call), :func:`create_block` builds
one block, :func:`list_blocks` names the kinds, and :func:`block_factory` binds a kind and
arguments into a :class:`BlockFactory`: the callable models receive, as torchvision's
builders receive ``norm_layer`` (and as timm's byobnet resolves its block types). A kind
given by name is resolved and checked here, once.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze.core.blocks import Squeezable, SqueezableBlock
from repsqueeze.zoo.acb import ACBlock
from repsqueeze.zoo.convbn import ConvBN
from repsqueeze.zoo.dbb import DiverseBranchBlock
from repsqueeze.zoo.expanded import ExpandedConv
from repsqueeze.zoo.layers import GEOMETRY, BlockArgs, channel_scale
from repsqueeze.zoo.mobileone import MobileOneBlock
from repsqueeze.zoo.qarepvgg import QARepVGGBlock
from repsqueeze.zoo.repvgg import RepVGGBlock

Build = TypeVar("Build", bound=Callable[..., nn.Module])
BlockLike = str | Callable[..., nn.Module]
"""What a model's ``block`` argument takes: a kind's name, a :class:`BlockFactory`, or a
block constructor."""
# arguments every kind takes besides BlockArgs' (online_norm: see make_block)
COMMON = ("groups", "dims", "deployed", "mode", "online_norm")
_SHARED = tuple(f.name for f in dataclasses.fields(BlockArgs))


class BlockFactory:
    """Builds blocks of one kind with bound arguments.

    ``factory(in_channels, out_channels, kernel_size=3, stride=1, **kwargs)`` builds a
    block; ``kwargs`` override the bound ones. Models take a factory as their ``block``
    argument; :func:`block_factory` makes one from a kind's name.

    Args:
        kind: the kind's name (a registered one, or the name of a custom constructor).
        build: the constructor, called as ``build(in_channels, out_channels, kernel_size,
            stride=..., **arguments)``.
        **defaults: bound arguments (``mode``, ``norm_layer``, ``deployed``, ...).
    """

    def __init__(self, kind: str, build: Callable[..., nn.Module], **defaults: Any) -> None:
        self.kind = kind
        self.build = build
        self.defaults: Mapping[str, Any] = MappingProxyType(defaults)

    def __repr__(self) -> str:
        bound = "".join(f", {k}={v!r}" for k, v in self.defaults.items())
        return f"BlockFactory({self.kind!r}{bound})"

    def __call__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, **kwargs
    ) -> nn.Module:
        for arg, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"make_block: {arg} must be a positive integer, got {value!r}")
        args = {**self.defaults, **kwargs}
        if args.pop("online_norm", False):
            return self._online_norm(in_channels, out_channels, kernel_size, stride, args)
        return self.build(in_channels, out_channels, kernel_size, stride=stride, **args)

    def _online_norm(self, in_channels, out_channels, kernel_size, stride, args) -> Squeezable:
        """The block with channel scales for norms, then one norm (OREPA-style)."""
        shared = BlockArgs(**{k: args[k] for k in ("dims", "norm_layer", "deployed") if k in args})
        mode = args.pop("mode", "chain")
        args["norm_layer"] = partial(channel_scale, dims=shared.dims)
        inner = self.build(in_channels, out_channels, kernel_size, stride=stride, **args)
        with shared.building():
            norm = shared.norm(out_channels)
        return SqueezableBlock(inner, norm, deployed=shared.deployed, mode=mode)

    def bind(self, **kwargs: Any) -> BlockFactory:
        """The same kind with more (or other) bound arguments."""
        return BlockFactory(self.kind, self.build, **{**self.defaults, **kwargs})

    def plain(self) -> BlockFactory:
        """Plain :class:`ConvBN` blocks sharing this factory's norm, mode, form and dims (the
        layers an architecture keeps plain: a ResNet's stem, 1x1 convs and shortcuts)."""
        keep = ("norm_layer", "mode", "deployed", "dims")
        return block_factory("plain", **{k: v for k, v in self.defaults.items() if k in keep})

    def parameters(self) -> list[str]:
        """Names of the arguments blocks of this kind take besides :data:`GEOMETRY`."""
        params = inspect.signature(self.build).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        own = [p.name for p in params if p.kind in kinds]
        shared = list(_SHARED) if any(p.kind == p.VAR_KEYWORD for p in params) else []
        names = [*COMMON, *own, *shared]
        return [n for i, n in enumerate(names) if n not in GEOMETRY and n not in names[:i]]

    def check(self, names: Mapping[str, Any] | list[str]) -> None:
        """Refuses arguments blocks of this kind do not take, naming those they take."""
        takes = self.parameters()
        for name in names:
            if name not in takes:
                raise TypeError(
                    f"a {self.kind!r} block got an unexpected keyword argument {name!r}; it "
                    f"takes {', '.join(takes)}"
                )

    def from_conv_bn(self, conv: nn.Module, bn: _BatchNorm, **kwargs: Any) -> Squeezable:
        """A block of this kind computing ``bn(conv(x))`` exactly (its ``from_conv_bn``).

        Raises:
            ValueError: a kind without ``from_conv_bn``, or a pair it cannot take over.
        """
        start = getattr(self.build, "from_conv_bn", None)
        if start is None:
            raise ValueError(f"{self.kind!r} blocks cannot start from a conv + BatchNorm")
        bound = {k: v for k, v in self.defaults.items() if k != "deployed"}
        return start(conv, bn, **{**bound, **kwargs})


_BLOCKS: dict[str, BlockFactory] = {}
BLOCKS: Mapping[str, BlockFactory] = MappingProxyType(_BLOCKS)
"""Every registered kind's :class:`BlockFactory` by name (read-only; see :func:`register_block`)."""


def register_block(name: str, build: Build | None = None, **defaults: Any) -> Any:
    """Registers a block kind; duplicate names are refused.

    As a decorator (``@register_block("mine")`` over a class) or a call
    (``register_block("expand_ck", ExpandedConv, expand_mode="ck")``). The constructor is
    called as ``build(in_channels, out_channels, kernel_size, stride=..., **arguments)``
    where the arguments include those of :class:`BlockArgs` that are set (models set
    ``deployed``; :func:`make_block` sets ``groups``, ``dims``, ``deployed``, ``mode``).

    Args:
        name: the kind's name, as ``create_model(..., block=name)`` takes it.
        build: the constructor; ``None`` returns a decorator.
        **defaults: arguments bound for this kind.

    Returns:
        ``build`` (so the decorator leaves the class as it is).
    """
    if build is None:
        return partial(register_block, name, **defaults)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a block kind is named by an identifier, got {name!r}")
    if name in _BLOCKS:
        raise ValueError(f"a block kind named {name!r} is already registered")
    _BLOCKS[name] = BlockFactory(name, build, **defaults)
    return build


def unregister_block(name: str) -> BlockFactory:
    """Removes the kind ``name`` (one registered for a test, say) and returns its factory; an
    unknown kind is refused as :func:`block_factory` refuses it."""
    block_factory(name)
    return _BLOCKS.pop(name)


def list_blocks() -> list[str]:
    """Names of the registered block kinds, in registration order."""
    return list(_BLOCKS)


def block_factory(block: BlockLike, **defaults: Any) -> BlockFactory:
    """A :class:`BlockFactory` for ``block`` with ``defaults`` bound.

    Args:
        block: a kind's name (see :func:`list_blocks`), a :class:`BlockFactory` (more
            arguments are bound to it), or a block constructor.
        **defaults: arguments bound for every block (checked against the kind's).

    Raises:
        ValueError: an unknown kind, naming the valid ones.
        TypeError: an argument the kind does not take, naming those it takes.
    """
    if isinstance(block, BlockFactory):
        factory = block
    elif isinstance(block, str):
        if block not in _BLOCKS:
            raise ValueError(f"unknown block kind {block!r}; valid kinds: {', '.join(_BLOCKS)}")
        factory = _BLOCKS[block]
    elif callable(block):
        factory = BlockFactory(getattr(block, "__name__", type(block).__name__), block)
    else:
        raise TypeError(f"block must be a kind's name or a block constructor, got {block!r}")
    factory.check(list(defaults))
    return factory.bind(**defaults) if defaults else factory


def make_block(
    kind: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    dims: int = 2,
    deployed: bool = False,
    mode: str = "chain",
    online_norm: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Builds a block of any kind; all kinds deploy to the same convolution.

    For odd ``kernel_size`` the deployed form is always
    ``ConvNd(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
    groups=groups, bias=True)``. ``create_block`` is the same function.

    Args:
        kind: a registered kind (:func:`list_blocks`: ``plain``, ``repvgg``, ``acb``,
            ``dbb``, ``mobileone``, ``expand_ck``, ``expand_cl``, ``qarepvgg``), or a
            :class:`BlockFactory`.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: kernel size of the deployed conv.
        stride: stride of the deployed conv.
        groups: groups of the deployed conv.
        dims: 1, 2 or 3 spatial dims.
        deployed: build the single convolution directly.
        mode: ``"chain"``, ``"online"`` or ``"auto"`` (see :meth:`Squeezable.set_mode`).
        online_norm: the OREPA-style variant: every BatchNorm inside the block becomes a
            learnable channel scale (:func:`channel_scale`) and one BatchNorm follows the
            block, so ``mode="online"`` can compose every branch while training.
        **kwargs: further arguments of the block's constructor (``norm_layer``, ...).
    """
    common = {"groups": groups, "dims": dims, "deployed": deployed, "mode": mode}
    factory = block_factory(kind)
    return factory(
        in_channels, out_channels, kernel_size, stride, online_norm=online_norm, **common, **kwargs
    )


create_block = make_block

register_block("plain", ConvBN)
register_block("repvgg", RepVGGBlock)
register_block("acb", ACBlock)
register_block("dbb", DiverseBranchBlock)
register_block("mobileone", MobileOneBlock)
register_block("expand_ck", ExpandedConv, expand_mode="ck")
register_block("expand_cl", ExpandedConv, expand_mode="cl")
register_block("qarepvgg", QARepVGGBlock)
