"""``torch.compile(fullgraph=True)`` traces every block kind in chain, online and deployed form.

CPU, ``backend="eager"`` (dynamo's tracing without code generation: what breaks graphs or
recompiles shows here already). Every form is traced as one graph, gives the eager outputs,
and is compiled once per distinct input shape, never per call. A representative set runs by
default; the full matrix of kinds and forms, and whole models, are marked ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from helpers import assert_equivalent
from torch._dynamo.utils import counters

import repsqueeze as rs
from repsqueeze.core import auto
from repsqueeze.zoo import make_block

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
]

BN_INSIDE = ("repvgg", "acb", "dbb", "mobileone", "qarepvgg")


def _compiled(module: torch.nn.Module) -> torch.nn.Module:
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(module, backend="eager", fullgraph=True)


def _block(kind: str, online_norm: bool, form: str) -> torch.nn.Module:
    torch.manual_seed(0)
    mode = "chain" if form == "deployed" else form
    block = make_block(kind, 4, 4, online_norm=online_norm, mode=mode).train()
    if form == "online" and kind in BN_INSIDE and not online_norm:
        block.eval()  # BatchNorm inside folds only with running statistics
    if form == "deployed":
        block = rs.deploy(block.eval())
    return block


FAST = {("dbb", True, "chain"), ("dbb", True, "online"), ("dbb", False, "deployed"),
        ("repvgg", False, "online"), ("expand_cl", False, "online"), ("acb", True, "online")}  # fmt: skip
CASES = [
    pytest.param(kind, norm, form, marks=() if (kind, norm, form) in FAST else pytest.mark.slow)
    for kind in rs.BLOCKS
    for norm in (False, True)
    for form in ("chain", "online", "deployed")
]


@pytest.mark.parametrize(("kind", "online_norm", "form"), CASES)
def test_every_block_compiles_fullgraph_once_per_shape(kind, online_norm, form):
    block = _block(kind, online_norm, form)
    reference = copy.deepcopy(block)
    compiled = _compiled(block)
    x = torch.randn(2, 4, 6, 6)
    y = compiled(x)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(torch.randn(2, 4, 6, 6))  # same shape: no recompile
    assert counters["stats"]["unique_graphs"] == 1
    assert_equivalent(y, reference(x), 1e-5)
    if form != "deployed" and block.training:
        y.sum().backward()
        assert all(p.grad is not None for p in block.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "mode"), [("repvgg", "online"), ("dbb", "chain")])
def test_a_model_compiles_once_however_many_blocks_it_has(kind, mode):
    """Blocks are inlined into one graph: no per-block frames, guards or recompiles."""
    torch.manual_seed(0)
    model = rs.create_model("digits_net", block=kind, online_norm=mode == "online")
    model = rs.set_mode(model, mode).train()
    compiled = _compiled(model)
    x = torch.randn(4, 1, 8, 8)
    compiled(x).sum().backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            compiled(torch.randn(4, 1, 8, 8)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_auto_decisions_taken_eagerly_are_reused_without_recompiling():
    torch.manual_seed(0)
    model = rs.set_mode(rs.create_model("digits_net", block="expand_cl", expansion=2), "auto")
    x = torch.randn(4, 1, 8, 8)
    model(x)  # eager: every block times both forms once and keeps its choice
    decided = [auto.decisions(b) for b in model.modules() if isinstance(b, rs.Squeezable)]
    compiled = _compiled(model)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            compiled(torch.randn(4, 1, 8, 8))
    assert counters["stats"]["unique_graphs"] == 1
    after = [auto.decisions(b) for b in model.modules() if isinstance(b, rs.Squeezable)]
    assert after == decided
