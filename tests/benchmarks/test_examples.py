"""The examples run end to end: a few training steps, deploy, ONNX export, all checked."""

import math

import pytest

from examples import segment

pytestmark = pytest.mark.usefixtures("single_thread")


def test_segmentation_example_trains_deploys_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    out = segment.main(["--steps", "3", "--batch", "4", "--size", "16", "--out", str(tmp_path)])
    assert math.isfinite(out["last_loss"])
    assert out["params_deployed"] < out["params"]  # the blocks' branches are gone
    assert out["deploy_rel_diff"] <= 1e-5
    assert (tmp_path / "segment.onnx").is_file() and out["onnx_rel_diff"] <= 1e-4
