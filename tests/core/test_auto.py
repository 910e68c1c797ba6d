"""``mode="auto"``: decided by timing both forms, kept per input shape, never timed under
``torch.compile``."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_equivalent

import repsqueeze as rs
from repsqueeze.core import auto
from repsqueeze.zoo import make_block

pytestmark = pytest.mark.usefixtures("single_thread")


def test_auto_times_both_forms_once_per_shape_and_leaves_no_trace(monkeypatch):
    torch.manual_seed(0)
    block = make_block("expand_cl", 4, 4, expansion=2, mode="auto").train()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    calls = []
    timing = auto.choose_by_timing
    monkeypatch.setattr(auto, "choose_by_timing", lambda *a: calls.append(a[1].shape) or timing(*a))
    x = torch.randn(2, 4, 8, 8)
    for _ in range(3):
        block(x)
    assert len(calls) == 1
    block(torch.randn(3, 4, 8, 8))
    assert len(calls) == 2
    assert set(auto.decisions(block).values()) <= {"chain", "online"}
    block.eval()
    with torch.no_grad():
        block(x)
    assert len(calls) == 3  # eval forward is another decision
    # the timing runs touched no running statistics and accumulated no gradients
    bn = block.layers[-1]
    assert bn.num_batches_tracked.item() == 4  # the four training forwards above, no more
    assert all(p.grad is None for p in block.parameters())
    assert torch.equal(before["layers.0.weight"], block.state_dict()["layers.0.weight"])


def test_auto_decision_is_the_faster_form(monkeypatch):
    """The timer's verdict is followed whichever way it goes."""
    block = make_block("expand_cl", 4, 4, expansion=2, mode="auto").train()
    for verdict in ("chain", "online"):
        block.set_mode("auto")
        monkeypatch.setattr(auto, "time_interleaved", lambda fns, *a, v=verdict: {
            k: (0.0 if k == v else 1.0) for k in fns
        })  # fmt: skip
        block(torch.randn(2, 4, 8, 8))
        assert list(auto.decisions(block).values()) == [verdict]


def test_auto_under_compile_does_not_time(monkeypatch):
    block = make_block("expand_cl", 4, 4, expansion=2, mode="auto").train()

    def refuse(*a):
        raise AssertionError("timed under torch.compile")

    monkeypatch.setattr(auto, "choose_by_timing", refuse)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    x = torch.randn(2, 4, 8, 8)
    y = compiled(x)
    assert auto.decisions(block) == {}  # the MAC model decided, nothing cached while tracing
    with torch.no_grad():
        assert_equivalent(y, rs.set_mode(copy.deepcopy(block), "chain")(x), 1e-5)
