"""The block tree: what a node is, how its parts combine, and the one walk over it.

A node of the tree is one of

* a *layer*: one of the accepted PyTorch layers (:mod:`repsqueeze.core.primitives`);
* a *combinator*: a :class:`Combinator` (every squeezable block) or an ``nn.Sequential``
  (a chain), whose named parts are nodes combined by its ``combine`` kind:

  - ``"chain"``: the parts run in order, each on the previous one's output;
  - ``"sum"``: the parts read the same input and their outputs are added;
  - ``"concat"``: the parts read the same input and their outputs are concatenated along
    channels;
  - ``"split"``: the input is split along channels (``split[i]`` channels for part ``i``)
    and the parts' outputs are concatenated;

* a *deployed* block: a combinator that holds one convolution (``conv``) in place of its
  parts.

Every interpretation of a tree (its geometry, its exact map, running it in chain mode, its
online terms, its cost) is a visitor: an object with one method per kind (``layer``,
``deployed``, ``chain``, ``sum``, ``concat``, ``split``), called through :func:`visit`,
which is the only place that tells the kinds apart.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from repsqueeze.core.primitives import Geometry

COMBINES = ("chain", "sum", "concat", "split")
KINDS = ("layer", "deployed", *COMBINES)


class Combinator(nn.Module):
    """A node whose parts combine by a kind of :data:`COMBINES` (the structure of a block).

    Subclasses say how their parts combine through two class attributes:

    Attributes:
        combine: ``"chain"``, ``"sum"``, ``"concat"`` or ``"split"`` (a property may decide
            it per instance, as :class:`~repsqueeze.core.blocks.Concat` does from
            ``split``).
        parts_name: the attribute (and state-dict prefix) holding the parts, an
            ``nn.ModuleList``.
        part_noun: what one part is called in messages (``"layer"``, ``"branch"``).
        split: for ``"split"``: input channels of each part.
        deployed: whether the block holds one convolution ``conv`` instead of its parts.
        deployed_geometry: the block's geometry once deployed (its padding may be
            asymmetric, which ``conv`` alone cannot say).

    Args:
        parts: the parts, in order.
        split: for ``"split"``: input channels of each part (kept as ``self.split``).
    """

    # Class defaults without annotations: TorchScript cannot read postponed (string) ones.
    combine = "chain"
    parts_name = "layers"
    part_noun = "part"
    split = None
    deployed = False
    deployed_geometry = None

    def __init__(self, parts: Sequence[nn.Module], split: Sequence[int] | None = None) -> None:
        super().__init__()
        if not parts:
            raise ValueError(f"{type(self).__name__} needs at least one {self.part_noun}")
        name = type(self).__name__
        if split is not None and (
            len(split) != len(parts) or not all(isinstance(c, int) and c > 0 for c in split)
        ):
            raise ValueError(
                f"{name}: split={tuple(split)} must give a positive channel count for each of "
                f"the {len(parts)} {self.parts_name}"
            )
        self.split = tuple(split) if split is not None else None
        if self.combine not in COMBINES:
            raise ValueError(f"{name}: combine must be one of {COMBINES}, got {self.combine!r}")
        if (self.combine == "split") != (self.split is not None):
            raise ValueError(
                f"{name}: split goes with combine='split' only (combine={self.combine!r}, "
                f"split={self.split})"
            )
        setattr(self, self.parts_name, nn.ModuleList(parts))
        self._memos: dict[str, dict] = {}

    def named_parts(self) -> list[tuple[str, nn.Module]]:
        """The parts in order, named as in the state dict."""
        return [(f"{self.parts_name}.{i}", m) for i, m in enumerate(getattr(self, self.parts_name))]

    def memo(self, owner: str) -> dict:
        """The dict in which the module ``owner`` keeps what it derived from this block's
        structure (geometry, online plans, auto-mode decisions); emptied on :meth:`hold`."""
        return self._memos.setdefault(owner, {})

    def forget(self) -> None:
        """Drops everything derived from the parts (call it after replacing a part; online
        mode also notices a replaced part by itself)."""
        for memo in self._memos.values():  # the dicts stay: torch.compile guards on them
            memo.clear()

    def hold(self, conv: nn.Module, geometry: Geometry) -> None:
        """Holds ``conv`` (in this block's train/eval mode) in place of the parts, which are
        freed; ``geometry``: the block's geometry, which the parts decided."""
        self.deployed_geometry = geometry
        self._memos.clear()
        delattr(self, self.parts_name)
        self.conv = conv.train(self.training)
        self.deployed = True

    def copy_memo(self) -> dict[int, object]:
        """Entries for ``copy.deepcopy``'s memo that copy this block without its parts (nor
        what was derived from them): for a copy that will :meth:`hold` a convolution."""
        return {id(getattr(self, self.parts_name)): nn.ModuleList(), id(self._memos): {}}


def kind_of(module: nn.Module) -> str:
    """The kind of a node: ``"layer"``, ``"deployed"`` or its combine kind."""
    if isinstance(module, Combinator):
        return "deployed" if module.deployed else module.combine
    if isinstance(module, nn.Sequential):
        return "chain"
    return "layer"


def parts(node: nn.Module) -> list[tuple[str, nn.Module]]:
    """The named parts of a combinator or an ``nn.Sequential``, in order."""
    return node.named_parts() if isinstance(node, Combinator) else list(node.named_children())


def visit(node: nn.Module, visitor: object, *args: object) -> object:
    """``visitor.<kind>(node, *args)`` for the kind of ``node`` (see :func:`kind_of`)."""
    return getattr(visitor, kind_of(node))(node, *args)


def join(path: str, name: str) -> str:
    """``path.name`` as in state-dict keys (``name`` alone at the top)."""
    return f"{path}.{name}" if path else name
