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

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from repsqueeze.core import chainops, online, primitives, recompute
from repsqueeze.core.algebra import ConvMap, Layout, Pad, chain, concat, conv_of, parallel
from repsqueeze.core.primitives import Geometry, Precision, identity_geometry, name_of, pad

MODES = online.MODES


class Squeezable(nn.Module):
    """Base of every block that squeezes into one convolution.

    Subclasses hold their children in an ``nn.ModuleList`` and call :meth:`_finalize` at the
    end of ``__init__``. After :meth:`deploy` the block holds only ``self.conv``.
    """

    # Class defaults without annotations: TorchScript cannot read postponed (string) ones.
    deployed = False
    mode = "chain"
    recompute = False
    _children_attr = ""
    # How the children combine: "chain" (in order) and "sum" (parallel branches) have fast
    # online rules; any other value (a subclass with its own _combine_maps) is composed
    # through _combine_maps, exactly but with dense kernels.
    _combine = "generic"

    def _finalize(self, deployed: bool = False, mode: str = "chain") -> None:
        """Validates the structure (errors name the layer) and builds the deployed form.

        Args:
            deployed: build the single convolution directly (its weights left at their
                default initialisation, for a state dict to fill) and drop the branches.
        """
        check_inner_hooks(self, "build")
        # the modules the training form runs as functions (hooks checked at each forward)
        self._inner_layers = tuple(m for _, m in inner_layers(self, ""))
        self._geometry_cache: dict[int, Geometry] = {}
        self._plans: dict[int, online.Plan] = {}
        self._auto_cache: dict[tuple, str] = {}
        self._ndim = node_ndim(self, "")
        if self._ndim is not None:
            self.geometry(self._ndim)
        self.set_mode(mode if not deployed else "chain")
        self.mode = mode
        if deployed:
            ndim = self._require_ndim()
            conv = conv_of(
                self.layout(ndim), self._padding_mode(), torch.get_default_dtype(), "cpu"
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

    def layout(self, ndim: int, head: int | None = None) -> Layout:
        """The squeezed convolution's shape (kernel, stride, padding, dilation, groups),
        decided from the structure alone and cached per structure: blocks of one kind and
        shape share one decision.

        Args:
            ndim: spatial dimensionality.
            head: compose only the first ``head`` children (online mode's plan); ``None``:
                all of them.
        """
        head = len(self.named_parts()) if head is None else head
        key = structure_key(self)
        key = (key, ndim, head) if key is not None else None
        found = _LAYOUTS.get(key) if key is not None else None
        if found is None:
            found = online.block_layout(self, ndim, head)
            if key is not None:
                if len(_LAYOUTS) >= _LAYOUTS_KEPT:
                    _LAYOUTS.clear()
                _LAYOUTS[key] = found
        return found

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.conv(x)  # (N, C_out, *spatial), or (C_out, *spatial) unbatched
        return self._forward_training(x)

    @torch.jit.unused  # not annotated: TorchScript cannot resolve postponed annotations here
    def _forward_training(self, x):
        check_inner_hooks(self, "forward")
        ndim = self._ndim or x.dim() - 2
        unbatched = x.dim() == ndim + 1  # (C, *spatial), as torch's convolutions take it
        if not unbatched and x.dim() != ndim + 2:
            raise ValueError(
                f"{type(self).__name__}: a {ndim}-D block takes (N, C, *spatial) or unbatched "
                f"(C, *spatial) input ({ndim + 2} or {ndim + 1} dims), got shape {tuple(x.shape)}"
            )
        x = x.unsqueeze(0) if unbatched else x  # (N, C, *spatial)
        if online.pick_mode(self, x, ndim) == "online":
            y = online.forward(self, x, ndim)
        elif self.recompute and torch.is_grad_enabled():
            y = recompute.checkpointed(lambda x: self._run_chain(x, ndim), x, self)
        else:
            y = self._run_chain(x, ndim)
        return y.squeeze(0) if unbatched else y

    def __prepare_scriptable__(self) -> Squeezable:
        """``torch.jit.script`` calls this first: a deployed block scripts (its forward is
        its conv); the training form composes kernels in Python, which TorchScript cannot
        compile."""
        if not self.deployed:
            raise TypeError(
                f"torch.jit.script: {type(self).__name__} is in training form, which "
                "TorchScript cannot compile; script rs.deploy(model) or, for a model of torch "
                "modules only, rs.deploy(model, unwrap=True)"
            )
        return self

    # --- modes: chain, online (repsqueeze.core.online), auto ------------------------------------------
    def set_mode(self, mode: str, recompute: bool | None = None) -> Squeezable:
        """Chooses how the training form runs.

        Args:
            mode: ``"chain"`` runs the layers; ``"online"`` composes the exact kernel and
                bias from the parameters in the forward pass (autograd flows through the
                composition) and runs one convolution; ``"auto"`` times both on the first
                batch of each input shape (on the device it runs) and keeps the faster one.
                BatchNorm with batch statistics cannot be folded online, except trailing
                BatchNorms, which run after the composed convolution. See
                :mod:`repsqueeze.core.online`.
            recompute: in chain mode keep only the block's input for backward and run the
                layers again during backward (:mod:`repsqueeze.core.recompute`: less memory, one
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
        :func:`repsqueeze.core.online.macs`)."""
        return online.macs(self, input_shape, batch)

    # --- squeeze and deploy ----------------------------------------------------------------
    @torch.no_grad()
    def squeeze(self) -> nn.Module:
        """A new ``nn.ConvNd`` equal to this block in eval mode; the block is unchanged.

        Composed in float64, cast once to the dtype of the block's parameters, on their
        device and in their memory format (``channels_last`` stays ``channels_last``); a
        value the cast overflows (float16) is a ``ValueError``. On the ``meta`` device the
        result is the deployed architecture with no values.
        """
        check_inner_hooks(self, "deploy")
        if self.deployed:
            conv = type(self.conv)(**_conv_kwargs(self.conv))
            conv.load_state_dict(self.conv.state_dict())
            return conv
        return squeeze_all([("", self)])[0]

    @torch.no_grad()
    def deploy(self) -> Squeezable:
        """Switches to the deployed form in place (one convolution) and frees the branches.

        Idempotent. BatchNorm is folded with its running statistics.
        """
        if not self.deployed:
            self._become(self.squeeze())
        return self

    def reparameterize(self) -> None:
        """timm's name for :meth:`deploy` (``timm.utils.reparameterize_model`` calls it): in
        place, returns ``None`` as timm's blocks do."""
        self.deploy()

    def _become(self, conv: nn.Module, geo: Geometry | None = None) -> None:
        """Holds ``conv`` (in this block's train/eval mode) in place of the children;
        ``geo``: the block's geometry when the children are already gone."""
        self._deployed_geometry = geo or self.geometry(self._require_ndim())
        self._plans.clear()
        delattr(self, self._children_attr)
        del self._inner_layers  # they are freed with the branches
        self.conv = conv.train(self.training)
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


# --- hooks on the layers inside a block ----------------------------------------------------
# torch.nn.utils functions that recompute a layer's weight in a forward pre-hook, and their
# replacements, parametrizations, which recompute it on every read of ``layer.weight``.
_WEIGHT_PRE_HOOKS = {
    WeightNorm: ("weight_norm", "torch.nn.utils.parametrizations.weight_norm"),
    SpectralNorm: ("spectral_norm", "torch.nn.utils.parametrizations.spectral_norm"),
}


def check_inner_hooks(block: Squeezable, when: str) -> None:
    """``ValueError`` naming the first layer inside ``block`` that has a hook the block
    would ignore.

    A block runs its layers as functions (on an input it padded once, or composed into one
    kernel), never as ``layer(x)``, so a layer's hooks are never called. Forward pre-hooks
    and forward hooks can change values: refused when ``when`` is ``"build"``, ``"deploy"``
    or ``"forward"``; backward hooks only at ``"forward"``. Parametrizations
    (``torch.nn.utils.parametrize``) are no hooks: the block reads them through
    ``layer.weight``.
    """
    forward = when == "forward"
    layers = block._inner_layers if forward else [m for _, m in inner_layers(block, "")]
    for m in layers:
        if (
            m._forward_pre_hooks
            or m._forward_hooks
            or forward
            and (m._backward_pre_hooks or m._backward_hooks)
        ):
            name = next((n for n, other in inner_layers(block, "") if other is m), "?")
            raise ValueError(f"{type(block).__name__}: {_hook_problem(m, name, when)}")


def inner_layers(node: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """Every module below a block or ``nn.Sequential`` that it runs as a function (layers,
    nested blocks and chains, a nested deployed block's conv), with its path."""
    if isinstance(node, Squeezable) and node.deployed:
        return [(join(path, "conv"), node.conv)] if path else []
    out = []
    for name, child in _parts(node):
        out.append((join(path, name), child))
        if isinstance(child, (Squeezable, nn.Sequential)):
            out += inner_layers(child, join(path, name))
    return out


def _hook_problem(layer: nn.Module, path: str, when: str) -> str:
    where = name_of(layer, path)
    ignored = "a block never calls its layers' hooks (it runs them as functions)"
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            return (
                f"{where} is pruned with torch.nn.utils.prune, whose forward pre-hook "
                f"recomputes the {hook._tensor_name}, and {ignored}: make the pruning "
                f"permanent first (prune.remove(layer, '{hook._tensor_name}')), or prune the "
                "deployed convolution"
            )
        if type(hook) in _WEIGHT_PRE_HOOKS:
            old, new = _WEIGHT_PRE_HOOKS[type(hook)]
            return (
                f"{where} has torch.nn.utils.{old}, whose forward pre-hook recomputes the "
                f"weight, and {ignored}: use {new} (a parametrization, which the block reads)"
            )
    kinds = [("forward pre-hook", layer._forward_pre_hooks), ("forward hook", layer._forward_hooks)]
    if when == "forward":
        kinds += [
            ("backward pre-hook", layer._backward_pre_hooks),
            ("backward hook", layer._backward_hooks),
        ]
    kind, hook = next((k, next(iter(h.values()))) for k, h in kinds if h)
    what = getattr(hook, "__qualname__", type(hook).__name__)
    return (
        f"{where} has a {kind} ({what}), and {ignored}: register it on the block itself, or "
        "keep the layer outside the block"
    )


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


# --- squeeze: the exact composite of many blocks, checked at once ---------------------------
_LAYOUTS: dict[tuple, Layout] = {}  # structure_key -> layout, shared by blocks alike
_LAYOUTS_KEPT = 4096


def structure_key(block: Squeezable) -> tuple | None:
    """What decides a block's squeezed architecture: the class, shape attributes and number
    of children of every module in it, in order; ``None`` for a block with a combination of
    its own (a subclass's ``_combine_maps``), whose architecture is never cached."""
    key = []
    for m in block.modules():
        if isinstance(m, Squeezable):
            if m._combine not in ("chain", "sum") and type(m) is not Concat and not m.deployed:
                return None
            extra = (m.deployed, getattr(m, "split", None))
            if m.deployed:
                extra += (m._deployed_geometry,)
        elif isinstance(m, primitives.CONVS):
            extra = (
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                m.groups, m.padding_mode,
            )  # fmt: skip
        elif isinstance(m, _BatchNorm):
            extra = (m.num_features,)
        elif isinstance(m, primitives.POOLS):
            extra = (
                m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                getattr(m, "divisor_override", None),
            )  # fmt: skip
        else:
            extra = ()
        extra = tuple(tuple(v) if isinstance(v, list) else v for v in extra)  # hashable
        key.append((type(m), len(m._modules), *extra))
    return tuple(key)


def memory_format_of(block: nn.Module) -> torch.memory_format:
    """``torch.channels_last`` (``_3d``) when a conv weight of the block is stored that way
    (a 1x1 kernel too: by its strides), else ``torch.contiguous_format``."""
    for m in block.modules():
        w = getattr(m, "weight", None) if isinstance(m, primitives.CONVS) else None
        if w is None or w.dim() not in (4, 5):
            continue
        fmt = torch.channels_last if w.dim() == 4 else torch.channels_last_3d
        if w.stride() == _strides(w.shape, fmt) != _strides(w.shape, torch.contiguous_format):
            return fmt
    return torch.contiguous_format


def _strides(shape: torch.Size, fmt: torch.memory_format) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=fmt).stride()


def squeeze_all(named: list[tuple[str, Squeezable]]) -> list[nn.Module]:
    """The squeezed convolution of each block (none deployed), the blocks unchanged.

    Each composite is built from the blocks' tensors in float64 with the fewest, largest
    ops (:mod:`repsqueeze.core.online`'s grouped terms; the architecture from :meth:`layout`);
    every input and output tensor is checked for non-finite values at once. Only when that
    check fails are the blocks rebuilt one by one with per-tensor checks, which raise the
    ``ValueError`` naming the layer (prefixed by the block's path, when given).

    Args:
        named: ``(path, block)`` pairs; ``path`` is prefixed to a block's error.
    """
    return _checked(named, _squeezed)


def composites(named: list[tuple[str, Squeezable]]) -> list[tuple[Tensor, Tensor]]:
    """The float64 ``(weight, bias)`` of each block's squeezed convolution (in the layout of
    :meth:`Squeezable.layout`; a deployed block's own), checked as in :func:`squeeze_all`."""
    return _checked(named, _composite)


def _checked(named: list[tuple[str, Squeezable]], build: Callable) -> list:
    """``build(block, check=False)`` of every block, then one check of all the tensors read
    and made; when it fails, ``build(block, check=True)`` block by block names the layer."""
    results, tensors = [], []
    for _, block in named:
        result, made = build(block, check=False)
        results.append(result)
        if made:  # (none on the meta device: no values to check)
            tensors += [t for t in (*block.parameters(), *block.buffers()) if t.is_floating_point()]
            tensors += made
    if primitives.all_finite(tensors):
        return results
    for i, (path, block) in enumerate(named):
        try:
            results[i] = build(block, check=True)[0]
        except ValueError as err:  # the block's message names layers inside it: add where
            raise ValueError(f"{path}: {err}" if path else str(err)) from err
    return results


def _composite(block: Squeezable, check: bool) -> tuple[tuple[Tensor, Tensor], list[Tensor]]:
    if block.deployed:
        conv = block.conv
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        pair = conv.weight.detach().double(), bias.detach().to(conv.weight.device).double()
        return pair, list(pair)
    how = Precision("exact", torch.float64, primitives.device_of(block), check=check)
    weight, bias = online.exact_composite(block, block.layout(block._require_ndim()), how)
    bias = bias if bias is not None else weight.new_zeros(weight.shape[0])
    return (weight, bias), [weight, bias]


def deploy_blocks(
    model: nn.Module, named: list[tuple[str, Squeezable]], inplace: bool
) -> nn.Module:
    """``model`` with the given blocks of it deployed (:func:`squeeze_all`: all checked before
    anything changes).

    Args:
        model: the model holding the blocks.
        named: ``(path, block)`` of blocks of ``model``, none inside another.
        inplace: deploy them in ``model``; else in a deep copy of ``model`` that never copies
            the children of these blocks (the convolutions replace them).
    """
    convs = squeeze_all(named)
    if inplace:
        for (_, block), conv in zip(named, convs, strict=True):
            block._become(conv)
        return model
    memo: dict[int, object] = {}
    geos = []
    for _, block in named:
        geos.append(block.geometry(block._require_ndim()))
        memo[id(getattr(block, block._children_attr))] = nn.ModuleList()
        memo[id(block._inner_layers)] = ()  # the same layers, listed for the hook checks
    model = copy.deepcopy(model, memo)
    for (_, block), conv, geo in zip(named, convs, geos, strict=True):
        memo[id(block)]._become(conv, geo)
    return model


def _squeezed(block: Squeezable, check: bool) -> tuple[nn.Module, list[Tensor]]:
    """``(conv, its tensors)``; ``check``: per-tensor checks, named errors."""
    ndim = block._require_ndim()
    block._in_channels()  # the error for a block that fixes no channel count
    lay = block.layout(ndim)
    device, dtype, mode = primitives.device_of(block), block._dtype(), block._padding_mode()
    fmt = memory_format_of(block)
    if device.type == "meta":  # no values: the architecture alone, from the structure
        return conv_of(lay, mode, dtype, device, memory_format=fmt), []
    how = Precision("exact", torch.float64, device, check=check)
    weight, bias = online.exact_composite(block, lay, how)
    conv = conv_of(lay, mode, dtype, device, weight, bias, fmt)
    if check:
        _check_cast(block, conv, weight, bias)
    return conv, [conv.weight, conv.bias]  # the cast composite: non-finite if it was


def _check_cast(block: Squeezable, conv: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """``ValueError`` when casting the float64 composite to the block's dtype overflowed."""
    for attr, exact in (("weight", weight), ("bias", bias)):
        if exact is None:
            continue
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
