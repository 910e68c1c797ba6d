"""Every refusal: the exception type, the layer it names (position and class) and the rule."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import repsqueeze as rs

pytestmark = pytest.mark.usefixtures("single_thread")


def _raises(exc: type[Exception], *fragments: str):
    """``pytest.raises`` that checks each fragment appears literally in the message."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


# --- non-linear layers -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer",
    [
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.MaxPool2d(2),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.LayerNorm(4),
        nn.Linear(4, 4),
        nn.ConvTranspose2d(4, 4, 3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_nonlinear_layer_in_chain_is_a_type_error(layer):
    name = type(layer).__name__
    with _raises(TypeError, f"layers.1 ({name})"):
        rs.SqueezableBlock(nn.Conv2d(3, 4, 3), layer, nn.Conv2d(4, 4, 1))


def test_nonlinear_layer_as_first_layer():
    with _raises(TypeError, "layers.0 (ReLU)"):
        rs.SqueezableBlock(nn.ReLU(), nn.Conv2d(3, 4, 3))


def test_nonlinear_layer_in_nested_sequential_names_the_full_path():
    with _raises(TypeError, "layers.1.2 (ReLU)"):
        rs.SqueezableBlock(
            nn.Conv2d(3, 4, 3),
            nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()),
        )


def test_nonlinear_branch_in_parallel():
    with _raises(TypeError, "branches.1 (Dropout)"):
        rs.Parallel(nn.Conv2d(3, 3, 3, padding=1), nn.Dropout())
    with _raises(TypeError, "branches.0.1 (SiLU)"):
        rs.Parallel(nn.Sequential(nn.Conv2d(3, 3, 1), nn.SiLU()), nn.Identity())


# --- channels --------------------------------------------------------------------------------
def test_channel_mismatch_between_convs():
    with _raises(ValueError, "layers.1 (Conv2d)", "channels", "layers.0 (Conv2d)"):
        rs.SqueezableBlock(nn.Conv2d(3, 4, 3), nn.Conv2d(5, 2, 3))


def test_channel_mismatch_of_batchnorm():
    with _raises(ValueError, "layers.2 (BatchNorm2d)", "channels"):
        rs.SqueezableBlock(nn.Conv2d(3, 4, 3), nn.Identity(), nn.BatchNorm2d(5))


def test_channel_mismatch_in_nested_sequential():
    with _raises(ValueError, "layers.1.1 (Conv2d)", "channels"):
        rs.SqueezableBlock(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(5, 2, 1)))


def test_channel_mismatch_between_branches():
    with _raises(ValueError, "branches.1 (Conv2d)", "output channels"):
        rs.Parallel(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1))
    with _raises(ValueError, "branches.1 (Conv2d)", "input channels"):
        rs.Parallel(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(2, 4, 1))


def test_identity_branch_needs_equal_channels():
    with _raises(ValueError, "branches.1 (Identity)", "channels"):
        rs.Parallel(nn.Conv2d(3, 4, 3, padding=1), nn.Identity())


# --- parallel geometry -----------------------------------------------------------------------
def test_misaligned_branches():
    with _raises(ValueError, "branches.1 (Conv2d)", "misaligned", "branches.0 (Conv2d)"):
        rs.Parallel(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=0))


def test_misaligned_identity_branch():
    with _raises(ValueError, "branches.1 (BatchNorm2d)", "misaligned"):
        rs.Parallel(nn.Conv2d(3, 3, 5, padding=1), nn.BatchNorm2d(3))


def test_branches_with_different_strides():
    with _raises(ValueError, "branches.1 (Conv2d)", "stride"):
        rs.Parallel(nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.Conv2d(3, 3, 1))
    with _raises(ValueError, "branches.1 (Sequential)", "stride"):
        rs.Parallel(
            nn.Conv2d(3, 3, 3, padding=1),
            nn.Sequential(nn.Conv2d(3, 3, 1, stride=2), nn.BatchNorm2d(3)),
        )


# --- padding modes and pooling ---------------------------------------------------------------
def test_mixed_padding_modes_in_chain():
    with _raises(ValueError, "layers.1 (Conv2d)", "padding_mode", "reflect", "zeros"):
        rs.SqueezableBlock(
            nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 3, 3, padding=1)
        )


def test_padded_avgpool_pads_with_zeros():
    with _raises(ValueError, "layers.1 (AvgPool2d)", "padding_mode"):
        rs.SqueezableBlock(
            nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), nn.AvgPool2d(3, 1, padding=1)
        )


def test_mixed_padding_modes_across_branches():
    with _raises(ValueError, "branches.1 (Conv2d)", "padding_mode"):
        rs.Parallel(
            nn.Conv2d(3, 3, 3, padding=1, padding_mode="replicate"),
            nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        )


def test_padding_mode_of_layers_that_do_not_pad_is_ignored():
    block = rs.SqueezableBlock(
        nn.Conv2d(3, 3, 1, padding_mode="circular"),
        nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(3, 3, 3, padding="valid", padding_mode="replicate"),
    )
    assert block.squeeze().padding_mode == "reflect"


def test_avgpool_count_include_pad_false_with_padding():
    with _raises(ValueError, "layers.1 (AvgPool2d)", "count_include_pad"):
        rs.SqueezableBlock(nn.Conv2d(3, 3, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False))


def test_avgpool_count_include_pad_false_without_padding_is_fine():
    block = rs.SqueezableBlock(nn.Conv2d(3, 3, 1), nn.AvgPool2d(3, 2, count_include_pad=False))
    assert block.squeeze().stride == (2, 2)


def test_avgpool_ceil_mode():
    with _raises(ValueError, "layers.0 (AvgPool1d)", "ceil_mode"):
        rs.SqueezableBlock(nn.AvgPool1d(2, ceil_mode=True), nn.Conv1d(2, 2, 1))


def test_mixed_dimensionality():
    with _raises(ValueError, "layers.1 (Conv2d)", "layers.0 (Conv1d)", "dimensionality"):
        rs.SqueezableBlock(nn.Conv1d(3, 3, 3), nn.Conv2d(3, 3, 3))


def test_empty_blocks():
    with pytest.raises(ValueError, match="at least one"):
        rs.SqueezableBlock()
    with pytest.raises(ValueError, match="at least one"):
        rs.Parallel()


# --- values at squeeze / deploy time ---------------------------------------------------------
def _block() -> rs.SqueezableBlock:
    return rs.SqueezableBlock(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3, padding=1)
    ).eval()


@pytest.mark.parametrize(
    ("index", "attr", "value"),
    [
        (0, "weight", float("nan")),
        (0, "bias", float("inf")),
        (1, "running_mean", float("nan")),
        (1, "running_var", float("inf")),
        (1, "weight", float("nan")),
        (1, "bias", float("-inf")),
        (2, "weight", float("-inf")),
    ],
)
def test_non_finite_values_are_refused(index, attr, value):
    block = _block()
    with torch.no_grad():
        getattr(block.layers[index], attr).view(-1)[0] = value
    where = f"layers.{index} ({type(block.layers[index]).__name__})"
    with _raises(ValueError, where, attr, "non-finite"):
        block.squeeze()
    with _raises(ValueError, where, "non-finite"):
        block.deploy()
    assert not block.deployed and hasattr(block, "layers")  # a refused deploy changes nothing
    model = nn.Sequential(nn.ReLU(), block)
    with _raises(ValueError, f"{where}", "non-finite"):
        rs.deploy(model)
    assert not block.deployed


def test_non_finite_value_in_nested_block_names_the_full_path():
    inner = rs.Parallel(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1))
    block = rs.SqueezableBlock(nn.Conv2d(2, 2, 1), inner)
    with torch.no_grad():
        inner.branches[0].weight[0, 0, 0, 0] = float("nan")
    assert "layers.1.branches.0.weight" in block.state_dict()
    with _raises(ValueError, "layers.1.branches.0 (Conv2d)", "non-finite"):
        block.squeeze()


def test_negative_running_variance_is_refused():
    block = _block()
    with torch.no_grad():
        block.layers[1].running_var[0] = -1.0
    with _raises(ValueError, "layers.1 (BatchNorm2d)", "running_var"):
        block.squeeze()


def test_batchnorm_without_running_statistics():
    block = rs.SqueezableBlock(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.Conv2d(4, 2, 1),
    ).eval()
    block(torch.randn(2, 3, 5, 5))  # it runs (with batch statistics), it just cannot fold
    with _raises(ValueError, "layers.1 (BatchNorm2d)", "running statistics"):
        block.squeeze()
    with _raises(ValueError, "layers.1 (BatchNorm2d)", "running statistics"):
        block.deploy()
    assert not block.deployed


def test_batchnorm_without_running_statistics_in_nested_sequential():
    block = rs.SqueezableBlock(
        nn.Conv2d(2, 2, 1),
        nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)),
    )
    with _raises(ValueError, "layers.1.1 (BatchNorm2d)", "running statistics"):
        block.squeeze()


def test_block_without_dimensionality_or_channels():
    with pytest.raises(ValueError, match="dimensionality"):
        rs.SqueezableBlock(nn.Identity()).squeeze()
    with pytest.raises(ValueError, match="channels"):
        rs.SqueezableBlock(nn.AvgPool2d(3, 1)).squeeze()
