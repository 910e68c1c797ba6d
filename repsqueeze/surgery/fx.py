"""The one ``torch.fx`` view of a model that whole-model passes use to prove a pattern.

A pass that rewrites two modules together (conv -> BatchNorm for :func:`expand`, conv -> ReLU
-> conv for INT8 equalization) must know that nothing else reads the first module's output
and that each module runs once; :class:`ModuleGraph` answers both from the traced graph.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn


class _LeafTracer(torch.fx.Tracer):
    """Keeps modules of the given types single ``call_module`` nodes (e.g. timm's
    ``BatchNormAct2d``, which the default tracer would trace through)."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


@dataclass
class ModuleGraph:
    """A traced model: its graph, its modules by path and how often each module is called.

    Attributes:
        graph: the ``torch.fx`` graph.
        modules: ``dict(model.named_modules())``.
        calls: ``call_module`` count per module path.
    """

    graph: torch.fx.Graph
    modules: dict[str, nn.Module]
    calls: Counter

    def module_nodes(self, kind: type | tuple[type, ...]) -> list[torch.fx.Node]:
        """The ``call_module`` nodes of modules of ``kind``, in graph order."""
        return [n for n in self.graph.nodes if isinstance(self.module_of(n), kind)]

    def module_of(self, node: torch.fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node calls; ``None`` for any other node."""
        return self.modules.get(node.target) if node.op == "call_module" else None

    def called_once(self, node: torch.fx.Node) -> bool:
        """Whether the module of ``node`` is called at this one place only."""
        return self.calls[node.target] == 1

    def only_user(self, node: torch.fx.Node, kind: type | tuple[type, ...]) -> torch.fx.Node | None:
        """The single user of ``node`` when it is a module of ``kind``, called once, whose
        only argument is ``node``; ``None`` otherwise."""
        users = list(node.users)
        if len(users) != 1 or not isinstance(self.module_of(users[0]), kind):
            return None
        user = users[0]
        return user if self.called_once(user) and tuple(user.args) == (node,) else None


def trace(model: nn.Module, leaves: tuple[type, ...] = ()) -> ModuleGraph:
    """Traces ``model`` with ``torch.fx``, keeping modules of ``leaves`` whole.

    Raises:
        Exception: whatever ``torch.fx`` raises for code it cannot trace.
    """
    graph = _LeafTracer(leaves).trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    return ModuleGraph(graph, dict(model.named_modules()), calls)
