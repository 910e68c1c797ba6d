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

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from repsqueeze.core import auto, cost, geometry, hooks, online, recompute, running, squeeze
from repsqueeze.core.algebra import Layout
from repsqueeze.core.auto import MODES
from repsqueeze.core.primitives import Geometry
from repsqueeze.core.tree import Combinator

__all__ = ["MODES", "Concat", "Parallel", "Squeezable", "SqueezableBlock"]


class Squeezable(Combinator):
    """Base of every block that squeezes into one convolution: a tree node whose parts
    combine by its ``combine`` kind (:class:`~repsqueeze.core.tree.Combinator`).

    A new combinator sets two class attributes, ``combine`` (``"chain"``, ``"sum"``,
    ``"concat"`` or ``"split"``) and ``parts_name`` (the attribute holding the parts), and
    passes its parts to this constructor, which checks the structure (errors name the layer)
    and builds the deployed form when asked. After :meth:`deploy` the block holds only
    ``self.conv``.

    Args:
        *parts: layers, ``nn.Sequential`` chains or nested blocks.
        split: for ``combine="split"``: input channels of each part.
        deployed: build the single convolution directly (its weights left at their default
            initialisation, for a state dict to fill) and drop the parts.
        mode: ``"chain"``, ``"online"`` or ``"auto"``; see :meth:`set_mode`.
    """

    # Class defaults without annotations: TorchScript cannot read postponed (string) ones.
    mode = "chain"
    recompute = False

    def __init__(
        self,
        *parts: nn.Module,
        split: Sequence[int] | None = None,
        deployed: bool = False,
        mode: str = "chain",
    ) -> None:
        super().__init__(parts, split)
        hooks.check_inner_hooks(self, "build")
        self._ndim = geometry.ndim_of(self)
        if self._ndim is not None:
            self.geometry(self._ndim)  # checks the structure
        self.set_mode(mode if not deployed else "chain")
        self.mode = mode
        if deployed:
            ndim = geometry.require_ndim(self)
            self.hold(squeeze.build_deployed(self), self.geometry(ndim))

    @property
    def ndim(self) -> int | None:
        """Spatial dimensionality (1, 2 or 3); ``None`` when no layer fixes it."""
        return self._ndim

    def geometry(self, ndim: int) -> Geometry:
        """Stride, padding, window and channels of the whole block."""
        return geometry.geometry_of(self, ndim)

    def layout(self, ndim: int, head: int | None = None) -> Layout:
        """The squeezed convolution's shape, decided from the structure alone
        (:func:`repsqueeze.core.squeeze.layout`; ``head``: the first ``head`` parts only)."""
        return squeeze.layout(self, ndim, head)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.deployed:
            return self.conv(x)  # (N, C_out, *spatial), or (C_out, *spatial) unbatched
        return self._forward_training(x)

    @torch.jit.unused  # not annotated: TorchScript cannot resolve postponed annotations here
    def _forward_training(self, x):
        hooks.check_inner_hooks(self, "forward")
        ndim = self._ndim or x.dim() - 2
        unbatched = x.dim() == ndim + 1  # (C, *spatial), as torch's convolutions take it
        if not unbatched and x.dim() != ndim + 2:
            raise ValueError(
                f"{type(self).__name__}: a {ndim}-D block takes (N, C, *spatial) or unbatched "
                f"(C, *spatial) input ({ndim + 2} or {ndim + 1} dims), got shape {tuple(x.shape)}"
            )
        x = x.unsqueeze(0) if unbatched else x  # (N, C, *spatial)
        if auto.pick_mode(self, x, ndim) == "online":
            y = online.forward(self, x, ndim)
        elif self.recompute and torch.is_grad_enabled():
            y = recompute.checkpointed(lambda x: running.run_block(self, x, ndim), x, self)
        else:
            y = running.run_block(self, x, ndim)
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

    # --- modes: chain, online, auto --------------------------------------------------------
    def set_mode(self, mode: str, recompute: bool | None = None) -> Squeezable:
        """Chooses how the training form runs.

        Args:
            mode: ``"chain"`` runs the layers; ``"online"`` composes the exact kernel and
                bias from the parameters in the forward pass (autograd flows through the
                composition) and runs one convolution; ``"auto"`` times both on the first
                batch of each input shape (on the device it runs) and keeps the faster one.
                BatchNorm with batch statistics cannot be folded online, except trailing
                BatchNorms, which run after the composed convolution. See
                :mod:`repsqueeze.core.online` and :mod:`repsqueeze.core.auto`.
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
        auto.forget(self)
        if mode != "chain" and not self.deployed and self._ndim is not None:
            online.plan(self, self._ndim)  # built here, outside any forward (torch.compile)
        return self

    def macs(self, input_shape: tuple[int, ...], batch: int = 1) -> dict[str, float]:
        """Multiply-accumulates of one forward pass of a batch in each mode (the cost model
        :func:`repsqueeze.core.cost.macs`)."""
        return cost.macs(self, input_shape, batch)

    # --- squeeze and deploy ----------------------------------------------------------------
    @torch.no_grad()
    def squeeze(self) -> nn.Module:
        """A new ``nn.ConvNd`` equal to this block in eval mode; the block is unchanged.

        Composed in float64, cast once to the dtype of the block's parameters, on their
        device and in their memory format (``channels_last`` stays ``channels_last``); a
        value the cast overflows (float16) is a ``ValueError``. On the ``meta`` device the
        result is the deployed architecture with no values.
        """
        hooks.check_inner_hooks(self, "deploy")
        if self.deployed:
            return squeeze.copy_of(self.conv)
        return squeeze.squeeze_all([("", self)])[0]

    @torch.no_grad()
    def deploy(self) -> Squeezable:
        """Switches to the deployed form in place (one convolution) and frees the parts.

        Idempotent. BatchNorm is folded with its running statistics.
        """
        if not self.deployed:
            self.hold(self.squeeze(), self.geometry(geometry.require_ndim(self)))
        return self

    def reparameterize(self) -> None:
        """timm's name for :meth:`deploy` (``timm.utils.reparameterize_model`` calls it): in
        place, returns ``None`` as timm's blocks do."""
        self.deploy()

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

    combine = "chain"
    parts_name = "layers"
    part_noun = "layer"


class Parallel(Squeezable):
    """The sum of branches that share stride and output alignment.

    A 1x1 conv with padding 0 beside a 3x3 conv with padding 1 is aligned; so is an
    ``Identity`` or a ``BatchNorm`` branch when channels match and the stride is 1.

    Args:
        *branches: layers, ``nn.Sequential`` chains or nested blocks.
        deployed: build the squeezed convolution directly instead of the branches.
        mode: ``"chain"``, ``"online"`` or ``"auto"``; see :meth:`Squeezable.set_mode`.
    """

    combine = "sum"
    parts_name = "branches"
    part_noun = "branch"


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

    parts_name = "branches"
    part_noun = "branch"
    __jit_unused_properties__ = ["combine"]  # noqa: RUF012  (TorchScript reads this name)

    @property
    def combine(self) -> str:
        """``"split"`` with ``split``, else ``"concat"``."""
        return "split" if self.split is not None else "concat"

    def extra_repr(self) -> str:
        split = f"split={self.split}" if self.split is not None else ""
        return ", ".join(filter(None, [split, super().extra_repr()]))
