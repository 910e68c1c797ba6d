"""Trainable blocks that squeeze into one convolution: chains and parallel branches.

The naive chain ``conv2(conv1(x))`` cannot be one convolution when ``conv2`` pads: its zero
border is applied to ``conv1``'s output, which no kernel on ``x`` reproduces. A
:class:`SqueezableBlock` instead pads its input *once*, by the total padding
``P = sum_i p_i * prod_{j<i} s_j``, with the layers' padding mode, and runs every layer
unpadded (border-consistent padding). Its output has the naive chain's shape and, away
from the border, the naive chain's values (in training mode too, as long as no BatchNorm
follows a padded layer's border); and it *is* one convolution, which
:meth:`Squeezable.squeeze` builds.

:class:`Parallel` sums branches; it pads once by the largest branch padding and hands each
branch the window it would have padded itself. :class:`Concat` does the same and
concatenates the branch outputs along channels (DBB's depth concatenation). Chains nest in
parallels and concatenations and those in chains to any depth; ``nn.Sequential`` inside a
block is a nested chain.

References: Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021;
Ding et al., "Diverse Branch Block", CVPR 2021; Guo et al., "ExpandNets", NeurIPS 2020.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from repsqueeze import chainops, online, primitives, recompute
from repsqueeze.algebra import ConvMap, Pad, chain, concat, parallel, to_conv
from repsqueeze.primitives import STRUCTURE, Geometry, Precision, identity_geometry, name_of, pad

MODES = online.MODES


class Squeezable(nn.Module):
    """Base of every block that squeezes into one convolution.

    Subclasses hold their children in an ``nn.ModuleList`` and call :meth:`_finalize` at the
    end of ``__init__``. After :meth:`deploy` the block holds only ``self.conv``.
    """

    deployed: bool = False
    mode: str = "chain"
    recompute: bool = False
    _children_attr: str = ""
    # How the children combine: "chain" (in order) and "sum" (parallel branches) have fast
    # online rules; any other value (a subclass with its own _combine_maps) is composed
    # through _combine_maps, exactly but with dense kernels.
    _combine: str = "generic"

    def _finalize(self, deployed: bool = False, mode: str = "chain") -> None:
        """Validates the structure (errors name the layer) and builds the deployed form.

        Args:
            deployed: build the single convolution directly (its weights left at their
                default initialisation, for a state dict to fill) and drop the branches.
        """
        self._geometry_cache: dict[int, Geometry] = {}
        self._plans: dict[int, online.Plan] = {}
        self._auto_cache: dict[tuple, str] = {}
        self._ndim = node_ndim(self, "")
        if self._ndim is not None:
            self.geometry(self._ndim)
        self.set_mode(mode if not deployed else "chain")
        self.mode = mode
        if deployed:
            conv = to_conv(
                self._structure(), self._padding_mode(), torch.get_default_dtype(), "cpu"
            )
            self._become(conv)

    # --- structure -------------------------------------------------------------------------
    def named_parts(self) -> list[tuple[str, nn.Module]]:
        """The children in order, named as in the state dict."""
        return [
            (f"{self._children_attr}.{i}", m)
            for i, m in enumerate(getattr(self, self._children_attr))
        ]

    @property
    def ndim(self) -> int | None:
        """Spatial dimensionality (1, 2 or 3); ``None`` when no layer fixes it."""
        return self._ndim

    def geometry(self, ndim: int) -> Geometry:
        """Stride, padding, window and channels of the whole block."""
        if self.deployed:
            return self._deployed_geometry
        if ndim not in self._geometry_cache:
            self._geometry_cache[ndim] = self._combine_geometry(ndim, "")
        return self._geometry_cache[ndim]

    def _combine_geometry(self, ndim: int, path: str) -> Geometry:
        raise NotImplementedError

    def _combine_maps(self, c_in: int, ndim: int, path: str, how: Precision) -> ConvMap:
        raise NotImplementedError

    def _run(self, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None) -> Tensor:
        """Runs the training form on ``x`` padded by this block's border (``lazy`` of it in
        zeros not applied yet: a convolution takes those as its own padding, no copy)."""
        raise NotImplementedError

    def _dtype(self) -> torch.dtype:
        tensors = [*self.parameters(), *self.buffers()]
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        return floats[0] if floats else torch.get_default_dtype()

    def _padding_mode(self) -> str:
        return self.geometry(self._require_ndim()).mode or "zeros"

    def _require_ndim(self) -> int:
        if self._ndim is None:
            raise ValueError(
                f"{type(self).__name__}: no layer fixes the spatial dimensionality (only "
                "Identity/SyncBatchNorm); add a ConvNd, BatchNormNd or AvgPoolNd"
            )
        return self._ndim

    def _in_channels(self) -> int:
        c_in = self.geometry(self._require_ndim()).c_in
        if c_in is None:
            raise ValueError(
                f"{type(self).__name__}: no layer fixes the number of channels (only Identity/"
                "AvgPool); add a convolution or a BatchNorm"
            )
        return c_in

    def _structure(self) -> ConvMap:
        return node_map(self, self._in_channels(), self._require_ndim(), "", STRUCTURE)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.conv(x)
        ndim = self._ndim or x.dim() - 2
        if online.pick_mode(self, x, ndim) == "online":
            return online.forward(self, x, ndim)
        if self.recompute and torch.is_grad_enabled():
            return recompute.checkpointed(lambda x: self._run_chain(x, ndim), x, self)
        return self._run_chain(x, ndim)

    # --- modes: chain, online (repsqueeze.online), auto ------------------------------------------
    def set_mode(self, mode: str, recompute: bool | None = None) -> Squeezable:
        """Chooses how the training form runs.

        Args:
            mode: ``"chain"`` runs the layers; ``"online"`` composes the exact kernel and
                bias from the parameters in the forward pass (autograd flows through the
                composition) and runs one convolution; ``"auto"`` times both on the first
                batch of each input shape (on the device it runs) and keeps the faster one.
                BatchNorm with batch statistics cannot be folded online, except trailing
                BatchNorms, which run after the composed convolution. See
                :mod:`repsqueeze.online`.
            recompute: in chain mode keep only the block's input for backward and run the
                layers again during backward (:mod:`repsqueeze.recompute`: less memory, one
                more forward pass of the block; BatchNorm statistics updated once).
                ``None`` leaves the setting as it is.
        """
        if mode not in MODES:
            raise ValueError(f"{type(self).__name__}: mode must be one of {MODES}, got {mode!r}")
        if recompute is not None:
            self.recompute = bool(recompute)
        self.mode = mode
        self._auto_cache = {}
        if mode != "chain" and not self.deployed and self._ndim is not None:
            online.plan(self, self._ndim)  # built here, outside any forward (torch.compile)
        return self

    def _online_head(self, parts: list[tuple[str, nn.Module]]) -> int:
        """How many of the children online mode composes; the rest run after the conv."""
        return len(parts)

    def _pick_mode(self, x: Tensor, ndim: int) -> str:
        return online.pick_mode(self, x, ndim)

    def _run_chain(self, x: Tensor, ndim: int) -> Tensor:
        """The training form, layer by layer, on an unpadded input."""
        geo = self.geometry(ndim)
        none = ((0, 0),) * ndim
        if geo.mode in (None, "zeros"):  # zeros: the first convolutions pad, no copy
            return self._run(x, none, ndim, geo.pad)
        x = pad(x, geo.pad, geo.mode)  # (N, C, *spatial + total padding)
        return self._run(x, none, ndim, None)

    def macs(self, input_shape: tuple[int, ...], batch: int = 1) -> dict[str, float]:
        """Multiply-accumulates of one forward pass of a batch in each mode (the cost model
        :func:`repsqueeze.online.macs`)."""
        return online.macs(self, input_shape, batch)

    # --- squeeze and deploy ----------------------------------------------------------------
    @torch.no_grad()
    def squeeze(self) -> nn.Module:
        """A new ``nn.ConvNd`` equal to this block in eval mode; the block is unchanged.

        Composed in float64, cast once to the dtype of the block's parameters; a value the
        cast overflows (float16) is a ``ValueError``. On the ``meta`` device the result is
        the deployed architecture with no values.
        """
        if self.deployed:
            conv = type(self.conv)(**_conv_kwargs(self.conv))
            conv.load_state_dict(self.conv.state_dict())
            return conv
        ndim = self._require_ndim()
        device = primitives.device_of(self)
        structure, mode, dtype = self._structure(), self._padding_mode(), self._dtype()
        if device.type == "meta":  # no values: the architecture alone, from the structure
            return to_conv(structure, mode, dtype, device)
        values = node_map(
            self, self._in_channels(), ndim, "", Precision("exact", torch.float64, device)
        )
        conv = to_conv(structure, mode, dtype, device, values)
        _check_cast(self, conv, values)
        return conv

    @torch.no_grad()
    def deploy(self) -> Squeezable:
        """Switches to the deployed form in place (one convolution) and frees the branches.

        Idempotent. BatchNorm is folded with its running statistics.
        """
        if not self.deployed:
            conv = self.squeeze()
            self._plans.clear()
            conv.train(self.training)
            self._become(conv)
        return self

    def reparameterize(self) -> None:
        """timm's name for :meth:`deploy` (``timm.utils.reparameterize_model`` calls it): in
        place, returns ``None`` as timm's blocks do."""
        self.deploy()

    def _become(self, conv: nn.Module) -> None:
        ndim = self._require_ndim()
        geo = self.geometry(ndim)
        self._deployed_geometry = geo
        delattr(self, self._children_attr)
        self.conv = conv
        self.deployed = True

    def extra_repr(self) -> str:
        return "deployed=True" if self.deployed else ""


class SqueezableBlock(Squeezable):
    """A chain of linear layers that squeezes into one convolution.

    Args:
        *layers: ``ConvNd``, ``BatchNormNd``/``SyncBatchNorm`` (before or after a conv),
            ``Identity``, ``AvgPoolNd``, ``nn.Sequential`` of these, nested blocks.
        deployed: build the squeezed convolution directly instead of the layers.
        mode: ``"chain"``, ``"online"`` or ``"auto"``; see :meth:`Squeezable.set_mode`.

    Example:
        >>> block = SqueezableBlock(nn.Conv2d(5, 3, 3, padding=1), nn.Conv2d(3, 1, 3, padding=1))
        >>> block.squeeze()  # Conv2d(5, 1, kernel_size=(5, 5), padding=(2, 2))
    """

    _children_attr = "layers"
    _combine = "chain"

    def __init__(self, *layers: nn.Module, deployed: bool = False, mode: str = "chain") -> None:
        super().__init__()
        if not layers:
            raise ValueError("SqueezableBlock needs at least one layer")
        self.layers = nn.ModuleList(layers)
        self._finalize(deployed, mode)

    def _combine_geometry(self, ndim: int, path: str) -> Geometry:
        return chain_geometry(self.named_parts(), ndim, path)

    def _combine_maps(self, c_in: int, ndim: int, path: str, how: Precision) -> ConvMap:
        return chain_map(self.named_parts(), c_in, ndim, path, how)

    def _online_head(self, parts: list[tuple[str, nn.Module]]) -> int:
        """Trailing BatchNorms run after the composed convolution, with batch statistics."""
        n = len(parts)
        while n > 1 and isinstance(parts[n - 1][1], _BatchNorm):
            n -= 1
        return n

    def _run(self, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None) -> Tensor:
        return chain_run([m for _, m in self.named_parts()], x, ext, ndim, lazy)


class Parallel(Squeezable):
    """The sum of branches that share stride and output alignment.

    A 1x1 conv with padding 0 beside a 3x3 conv with padding 1 is aligned; so is an
    ``Identity`` or a ``BatchNorm`` branch when channels match and the stride is 1.

    Args:
        *branches: layers, ``nn.Sequential`` chains or nested blocks.
        deployed: build the squeezed convolution directly instead of the branches.
        mode: ``"chain"``, ``"online"`` or ``"auto"``; see :meth:`Squeezable.set_mode`.
    """

    _children_attr = "branches"
    _combine = "sum"

    def __init__(self, *branches: nn.Module, deployed: bool = False, mode: str = "chain") -> None:
        super().__init__()
        if not branches:
            raise ValueError("Parallel needs at least one branch")
        self.branches = nn.ModuleList(branches)
        self._finalize(deployed, mode)

    def _combine_geometry(self, ndim: int, path: str) -> Geometry:
        return parallel_geometry(self.named_parts(), ndim, path)

    def _combine_maps(self, c_in: int, ndim: int, path: str, how: Precision) -> ConvMap:
        maps = [node_map(m, c_in, ndim, join(path, n), how) for n, m in self.named_parts()]
        return parallel(maps)

    def _run(self, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None) -> Tensor:
        ys = run_branches(self.named_parts(), self.geometry(ndim).pad, x, ext, ndim, lazy)
        return sum(ys[1:], ys[0])


class Concat(Squeezable):
    """Branches whose outputs are concatenated along channels, in order (DBB's transform IV).

    The branches read the same input (or, with ``split``, consecutive slices of its channels)
    and share stride and output alignment, as in :class:`Parallel`; each contributes its
    output channels (an ``Identity``, ``BatchNorm`` or ``AvgPool`` branch its input channels).
    It squeezes into one convolution with the branches' kernels stacked along output channels,
    each at its offset in the common window; with ``split`` the kernel is block-diagonal, one
    grouped convolution when the slices and the branches' outputs are of equal sizes.

    Args:
        *branches: layers, ``nn.Sequential`` chains or nested blocks.
        split: input channels of each branch: the input is split along channels (as
            ``torch.split``) and branch ``i`` reads slice ``i`` (channel-split designs:
            ResNeXt-style groups, ShuffleNet-style identity halves). ``None``: every branch
            reads the whole input.
        deployed: build the squeezed convolution directly instead of the branches.
        mode: ``"chain"``, ``"online"`` or ``"auto"``; see :meth:`Squeezable.set_mode`.

    Example:
        >>> inception = Concat(
        ...     nn.Conv2d(8, 4, 1),
        ...     nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)),
        ...     nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(8, 4, 1)),
        ... )
        >>> inception.squeeze()  # Conv2d(8, 12, kernel_size=(3, 3), padding=(1, 1))
    """

    _children_attr = "branches"

    def __init__(
        self,
        *branches: nn.Module,
        split: Sequence[int] | None = None,
        deployed: bool = False,
        mode: str = "chain",
    ) -> None:
        super().__init__()
        if not branches:
            raise ValueError("Concat needs at least one branch")
        if split is not None and (
            len(split) != len(branches) or not all(isinstance(c, int) and c > 0 for c in split)
        ):
            raise ValueError(
                f"Concat: split={tuple(split)} must give a positive channel count for each of "
                f"the {len(branches)} branches"
            )
        self.split = tuple(split) if split is not None else None
        self.branches = nn.ModuleList(branches)
        self._finalize(deployed, mode)

    def _combine_geometry(self, ndim: int, path: str) -> Geometry:
        return concat_geometry(self.named_parts(), ndim, path, self.split)

    def _combine_maps(self, c_in: int, ndim: int, path: str, how: Precision) -> ConvMap:
        c_ins = self.split or (c_in,) * len(self.named_parts())
        maps = [
            node_map(m, c, ndim, join(path, n), how)
            for (n, m), c in zip(self.named_parts(), c_ins, strict=True)
        ]
        return concat(maps, split=self.split is not None)

    def _run(self, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None) -> Tensor:
        if self.split is not None and x.shape[1] != sum(self.split):
            raise ValueError(
                f"Concat: split={self.split} needs {sum(self.split)} input channels, "
                f"got {x.shape[1]}"
            )
        border = self.geometry(ndim).pad
        ys = run_branches(self.named_parts(), border, x, ext, ndim, lazy, self.split)
        return torch.cat(ys, dim=1)  # (N, sum of the branches' C_out, *spatial)

    def extra_repr(self) -> str:
        split = f"split={self.split}" if self.split is not None else ""
        return ", ".join(filter(None, [split, super().extra_repr()]))


# --- dispatch over the kinds of node: block, Sequential, single layer ------------------------
def node_ndim(module: nn.Module, path: str) -> int | None:
    """Spatial dimensionality fixed by a node; ``ValueError`` when its layers disagree."""
    if isinstance(module, Squeezable) and module.deployed:
        return module.conv.weight.dim() - 2
    if isinstance(module, (Squeezable, nn.Sequential)):
        parts = _parts(module)
        found, where = None, ""
        for name, child in parts:
            n = node_ndim(child, join(path, name))
            if n is not None and found is not None and n != found:
                raise ValueError(
                    f"{name_of(child, join(path, name))} is {n}-D but {where} is {found}-D; "
                    "one block has one spatial dimensionality"
                )
            if n is not None and found is None:
                found, where = n, name_of(child, join(path, name))
        return found
    if not primitives.is_primitive(module):
        primitives.geometry(module, 2, path)  # raises the TypeError naming the layer
    return primitives.ndim_of(module)


def node_geometry(module: nn.Module, ndim: int, path: str) -> Geometry:
    if isinstance(module, Squeezable):
        return module.geometry(ndim)
    if isinstance(module, nn.Sequential):
        return chain_geometry(_seq_parts(module), ndim, path)
    return primitives.geometry(module, ndim, path)


def node_map(module: nn.Module, c_in: int, ndim: int, path: str, how: Precision) -> ConvMap:
    if isinstance(module, Squeezable):
        if module.deployed:
            return _deployed_map(module, c_in, ndim, path, how)
        return module._combine_maps(c_in, ndim, path, how)
    if isinstance(module, nn.Sequential):
        return chain_map(_seq_parts(module), c_in, ndim, path, how)
    return primitives.linear_map(module, c_in, ndim, path, how)


def node_run(module: nn.Module, x: Tensor, ext: Pad, ndim: int, lazy: Pad | None = None) -> Tensor:
    if isinstance(module, Squeezable):
        if module.deployed:
            return _deployed_run(module, pad(x, lazy, "zeros"), ndim)
        return module._run(x, ext, ndim, lazy)
    if isinstance(module, nn.Sequential):
        return chain_run(list(module), x, ext, ndim, lazy)
    return primitives.run(module, x, ext, ndim, lazy)


def join(path: str, name: str) -> str:
    """``path.name`` as in state-dict keys (``name`` alone at the top)."""
    return f"{path}.{name}" if path else name


def _seq_parts(seq: nn.Sequential) -> list[tuple[str, nn.Module]]:
    return list(seq.named_children())


def _parts(node: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named children of a block or an ``nn.Sequential``, in order."""
    return node.named_parts() if isinstance(node, Squeezable) else _seq_parts(node)


# --- chains --------------------------------------------------------------------------------
def chain_geometry(parts: list[tuple[str, nn.Module]], ndim: int, path: str) -> Geometry:
    total = identity_geometry(ndim)
    stride, pad, extent = list(total.stride), [list(p) for p in total.pad], list(total.extent)
    mode = mode_from = None
    c_in = channels = None
    last = None
    for name, child in parts:
        where = join(path, name)
        g = node_geometry(child, ndim, where)
        if g.mode is not None:
            _check_mode(mode, mode_from, g.mode, name_of(child, where))
            mode, mode_from = g.mode, mode_from or name_of(child, where)
        if g.c_in is not None:
            if channels is not None and g.c_in != channels:
                raise ValueError(
                    f"{name_of(child, where)} expects {g.c_in} input channels but "
                    f"{last} produces {channels}"
                )
            c_in = c_in if channels is not None else g.c_in
            channels, last = g.c_out, name_of(child, where)
        for d in range(ndim):
            pad[d][0] += stride[d] * g.pad[d][0]
            pad[d][1] += stride[d] * g.pad[d][1]
            extent[d] += stride[d] * (g.extent[d] - 1)
            stride[d] *= g.stride[d]
    return Geometry(tuple(stride), tuple(map(tuple, pad)), tuple(extent), mode, c_in, channels)


def chain_map(
    parts: list[tuple[str, nn.Module]], c_in: int, ndim: int, path: str, how: Precision
) -> ConvMap:
    total = None
    for name, child in parts:
        m = node_map(child, c_in, ndim, join(path, name), how)
        total = m if total is None else chain(total, m)
        c_in = m.weight.shape[0]
    return total


def chain_run(
    layers: list[nn.Module], x: Tensor, ext: Pad, ndim: int, lazy: Pad | None = None
) -> Tensor:
    # Border each layer's output carries for the layers after it, computed back to front.
    exts = [ext]
    for layer in reversed(layers[1:]):
        g = node_geometry(layer, ndim, "")
        exts.append(
            tuple(
                (p[0] + s * e[0], p[1] + s * e[1])
                for p, s, e in zip(g.pad, g.stride, exts[-1], strict=True)
            )
        )
    # The lazy border stays unapplied while it is a per-channel constant (`fill`, None for
    # zeros): pointwise convs, BatchNorm and Identity run on the interior only, natively, and
    # map the constant (DBB's BN-and-pad, generalised); the first layer that reads across the
    # border gets it materialised.
    fill = None
    for layer, e in zip(layers, reversed(exts), strict=True):
        if lazy is not None and any(map(any, lazy)):
            kept = _constant_border_through(layer, x, fill, ndim)
            if kept is not None:
                x, fill = kept
                continue
            if fill is not None:
                x, lazy, fill = chainops.pad_filled(x, lazy, fill), None, None
        x = node_run(layer, x, e, ndim, lazy)
        lazy = None
    if fill is not None:
        x = chainops.pad_filled(x, lazy, fill)
    elif lazy is not None:
        x = pad(x, lazy, "zeros")
    return x


def _constant_border_through(
    layer: nn.Module, x: Tensor, fill: Tensor | None, ndim: int
) -> tuple[Tensor, Tensor | None] | None:
    """``(layer(interior), layer(border constant))`` when a layer maps a per-channel constant
    border to a per-channel constant and its interior output reads no border; else ``None``."""
    if isinstance(layer, nn.Identity):
        return x, fill
    if isinstance(layer, primitives.CONVS):
        if any(k != 1 for k in layer.kernel_size) or any(s != 1 for s in layer.stride):
            return None
        if any(map(any, primitives.conv_padding(layer))):
            return None
        y = primitives.CONV_FN[ndim](x, layer.weight, layer.bias, 1, 0, 1, layer.groups)
        if fill is not None:
            fill = online.bias_through(layer.weight, layer.groups, fill)
            fill = fill if layer.bias is None else fill + layer.bias
        else:
            fill = layer.bias
        return y, fill
    if isinstance(layer, _BatchNorm) and not primitives.syncs(layer):
        if primitives.uses_batch_stats(layer):
            primitives.check_values_per_channel(layer, x, ((0, 0),) * ndim)
            if chainops.fast_path(layer):  # one reduction for the interior and the border
                return chainops.batch_norm_with_border(layer, x, fill)
            # the statistics bn(x) normalises with, kept differentiable for the border
            var, mean = torch.var_mean(x, [0, *range(2, x.dim())], correction=0)
            scale = torch.rsqrt(var + layer.eps)
            scale = scale * layer.weight if layer.affine else scale
            shift = layer.bias if layer.affine else torch.zeros_like(mean)
            if fill is None:  # bn(0) = bias - mean * scale
                fill = torch.addcmul(shift, mean, scale, value=-1)
            else:
                fill = torch.addcmul(shift, fill - mean, scale)
        else:
            live = Precision("live", x.dtype, x.device)
            scale, shift = primitives.bn_affine(layer, "", live)
            fill = shift if fill is None else torch.addcmul(shift, fill, scale)
        return layer(x), fill
    return None


# --- parallel branches ---------------------------------------------------------------------
def parallel_geometry(parts: list[tuple[str, nn.Module]], ndim: int, path: str) -> Geometry:
    geos, common = aligned_geometry(parts, ndim, path, "parallel branches")
    c_in = common.c_in
    c_out = next((g.c_out for _, g in geos if g.c_out is not None), None)
    for name, g in geos:
        if g.c_out is not None and g.c_out != c_out:
            raise ValueError(
                f"{name} gives {g.c_out} output channels but another branch gives {c_out}"
            )
        if g.c_in is None and c_in is not None and c_in != c_out:
            raise ValueError(
                f"{name} keeps its channel count, but the other branches map {c_in} to {c_out} "
                "channels; an identity-like branch needs equal input and output channels"
            )
    c_in = c_in if c_in is not None else c_out
    c_out = c_out if c_out is not None else c_in
    return replace(common, c_in=c_in, c_out=c_out)


def concat_geometry(
    parts: list[tuple[str, nn.Module]], ndim: int, path: str, split: tuple[int, ...] | None = None
) -> Geometry:
    """Like :func:`parallel_geometry`; the output channels are the sum of the branches'.

    With ``split`` branch ``i`` reads ``split[i]`` channels and the input has their sum.
    """
    what = "concatenated branches"
    geos, common = aligned_geometry(parts, ndim, path, what, shared_input=split is None)
    if split is not None:
        c_out = 0
        for (name, g), c in zip(geos, split, strict=True):
            if g.c_in is not None and g.c_in != c:
                raise ValueError(
                    f"{name} takes {g.c_in} input channels but split gives it {c}; with split, "
                    "branch i reads split[i] channels of the input"
                )
            c_out += g.c_out if g.c_out is not None else c
        return replace(common, c_in=sum(split), c_out=c_out)
    if common.c_in is None:
        where = f"Concat at {path}" if path else "Concat"
        raise ValueError(
            f"{where}: no branch fixes the number of input channels (only Identity/AvgPool "
            "branches), so the number of output channels is unknown; add a convolution or a "
            "BatchNorm to one branch"
        )
    c_out = sum(g.c_out if g.c_out is not None else common.c_in for _, g in geos)
    return replace(common, c_out=c_out)


def aligned_geometry(
    parts: list[tuple[str, nn.Module]],
    ndim: int,
    path: str,
    what: str,
    shared_input: bool = True,
) -> tuple[list[tuple[str, Geometry]], Geometry]:
    """Checks that branches share stride, alignment, padding mode and input channels.

    Args:
        parts: the named branches.
        ndim: spatial dimensionality.
        path: where the branches sit, for the messages.
        what: the branches' kind in the messages (``"parallel branches"``).
        shared_input: the branches read the same input (else input channels are not checked).

    Returns:
        ``(name, geometry)`` per branch, and the common geometry (largest padding per side,
        its window, the mode, the input channels or ``None``; output channels ``None``).
    """
    geos = [(name_of(m, join(path, n)), node_geometry(m, ndim, join(path, n))) for n, m in parts]
    first_name, first = geos[0]
    mode = mode_from = None
    c_in, c_in_from = next(((g.c_in, n) for n, g in geos if g.c_in is not None), (None, None))
    for name, g in geos:
        if g.stride != first.stride:
            raise ValueError(
                f"{name} has stride {g.stride} but {first_name} has {first.stride}; "
                f"{what} must share stride"
            )
        if g.slack != first.slack:
            raise ValueError(
                f"{name} is misaligned with {first_name}: padding {g.pad} with window "
                f"{g.extent} vs padding {first.pad} with window {first.extent}; {what} must "
                "satisfy pad_left + pad_right - window = same value so their outputs overlap"
            )
        if g.mode is not None:
            _check_mode(mode, mode_from, g.mode, name)
            mode, mode_from = g.mode, mode_from or name
        if shared_input and g.c_in is not None and g.c_in != c_in:
            raise ValueError(
                f"{name} takes {g.c_in} input channels but {c_in_from} takes {c_in}; "
                f"{what} read the same input"
            )
    pad = tuple(
        (max(g.pad[d][0] for _, g in geos), max(g.pad[d][1] for _, g in geos)) for d in range(ndim)
    )
    extent = tuple(p[0] + p[1] - s for p, s in zip(pad, first.slack, strict=True))
    return geos, Geometry(first.stride, pad, extent, mode, c_in, None)


def run_branches(
    parts: list[tuple[str, nn.Module]],
    border: Pad,
    x: Tensor,
    ext: Pad,
    ndim: int,
    lazy: Pad | None,
    split: tuple[int, ...] | None = None,
) -> list[Tensor]:
    """Runs each branch on the window it would have padded itself.

    Args:
        parts: the named branches.
        border: the border ``x`` carries for them (the largest branch padding, per side).
        x: the input, padded by ``border`` plus what ``ext`` needs (``lazy`` of it not yet).
        ext: border the outputs carry for the layers downstream.
        ndim: spatial dimensionality.
        lazy: zeros of that padding not applied to ``x`` yet.
        split: channels of each branch's slice of ``x``; ``None``: all of ``x`` for each.
    """
    lazy = lazy or ((0, 0),) * ndim
    starts = [0, *itertools.accumulate(split)] if split is not None else None
    outputs = []
    for b, (_, branch) in enumerate(parts):
        channels = slice(starts[b], starts[b + 1]) if starts is not None else slice(None)
        own = node_geometry(branch, ndim, "").pad
        # the branch needs `own` border, not the block's: crop the difference, first
        # from the zeros not yet applied, then from x itself
        window, branch_lazy = [], []
        for d, ((pl, pr), (bl, br), (zl, zr)) in enumerate(zip(border, own, lazy, strict=True)):
            cl, cr = pl - bl, pr - br
            window.append(slice(max(cl - zl, 0), x.shape[d + 2] - max(cr - zr, 0)))
            branch_lazy.append((max(zl - cl, 0), max(zr - cr, 0)))
        full = starts is None and all(
            w.start == 0 and w.stop == n for w, n in zip(window, x.shape[2:], strict=True)
        )
        crop = x if full else x[(slice(None), channels, *window)]  # a view; none when full
        outputs.append(node_run(branch, crop, ext, ndim, tuple(branch_lazy)))
    return outputs


def _check_mode(mode: str | None, mode_from: str | None, new: str, where: str) -> None:
    if mode is not None and new != mode:
        raise ValueError(
            f"{where} pads with padding_mode='{new}' but {mode_from} pads with '{mode}'; "
            "a block pads its input once, so all its padded layers must share one mode"
        )


# --- deployed nodes inside a block that is still in training form ---------------------------
def _deployed_map(block: Squeezable, c_in: int, ndim: int, path: str, how: Precision) -> ConvMap:
    m = primitives.linear_map(block.conv, c_in, ndim, join(path, "conv"), how)
    geo = block._deployed_geometry
    # Drop the zero taps a symmetric-padding conv added around an asymmetric window.
    window = tuple(
        slice(q - l, q - l + e)
        for (q, _), (l, _), e in zip(m.pad, geo.pad, geo.extent, strict=True)
    )
    return ConvMap(m.weight[(slice(None), slice(None), *window)], m.bias, m.stride, geo.pad)


def _deployed_run(block: Squeezable, x: Tensor, ndim: int) -> Tensor:
    conv, geo = block.conv, block._deployed_geometry
    # The input carries the block's own (possibly asymmetric) border; top it up with zeros
    # where the conv's symmetric padding has only zero taps.
    extra = tuple((q - l, q - r) for q, (l, r) in zip(conv.padding, geo.pad, strict=True))
    return primitives.run(conv, pad(x, extra, "zeros"), ((0, 0),) * ndim, ndim)


def _check_cast(block: Squeezable, conv: nn.Module, values: ConvMap) -> None:
    """``ValueError`` when casting the float64 composite to the block's dtype overflowed."""
    for attr, exact in (("weight", values.weight), ("bias", values.bias)):
        if not torch.isfinite(getattr(conv, attr)).all():
            dtype = str(conv.weight.dtype).removeprefix("torch.")
            raise ValueError(
                f"{type(block).__name__}: the composite {attr} overflows {dtype} (largest "
                f"|value| {exact.abs().max().item():.4g}, {dtype} holds up to "
                f"{torch.finfo(conv.weight.dtype).max:.4g}); deploy in float32 (.float() "
                "before deploy)"
            )


def _conv_kwargs(conv: nn.Module) -> dict:
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
        "device": conv.weight.device,
        "dtype": conv.weight.dtype,
    }
