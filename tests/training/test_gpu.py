"""GPU checks (marked ``gpu``; skipped without CUDA). Run them on the device with
``bash benchmarks/gpu.sh`` (see its header), or ``pytest -m gpu`` on any CUDA machine.

1. squeeze equality on CUDA for every block kind, TF32 on (loose) and off (strict);
2. online == chain on CUDA, float64 and float32;
3. one Lightning fit + test with ``trainer=gpu``, fp32 and bf16-mixed: the deploy check
   must pass with the default tolerance (TF32 would otherwise exceed it);
4. ``deploy.py`` on that GPU-trained checkpoint in a process that sees no GPU.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import randomize

import repsqueeze as rs
from repsqueeze.cli import train as cli_train
from repsqueeze.core.numerics import strict_fp32
from repsqueeze.zoo import BLOCKS

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
# The test bodies can be debugged without a GPU: GPU_TEST_DEVICE=cpu, calling them directly
# (pytest still skips them without CUDA).
DEVICE = os.environ.get("GPU_TEST_DEVICE", "cuda")
KINDS = list(BLOCKS)


@contextlib.contextmanager
def tf32_on() -> Iterator[None]:
    """TF32 for cuDNN convolutions and CUDA matmuls, as on a default Ampere+ setup."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("tf32, tol", [(False, 1e-5), (True, 1e-3)], ids=["strict", "tf32"])
@pytest.mark.parametrize("kind", KINDS)
def test_squeeze_equals_training_form_on_cuda(kind, tf32, tol, stride):
    gen = torch.Generator().manual_seed(0)
    block = randomize(rs.make_block(kind, 16, 24, 3, stride), gen).eval().to(DEVICE)
    x = torch.randn(4, 16, 19, 23, generator=gen).to(DEVICE)
    conv = block.squeeze()
    assert conv.weight.device.type == DEVICE and conv.weight.dtype == torch.float32
    with tf32_on() if tf32 else strict_fp32(), torch.no_grad():
        assert _relative(block(x), conv(x)) <= tol


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
@pytest.mark.parametrize("kind", KINDS)
def test_online_equals_chain_on_cuda(kind, dtype, tol):
    """Eval mode (BatchNorm folded with running statistics) and training mode with the
    OREPA-style norm (the trailing BatchNorm uses batch statistics in both forms): outputs
    and input gradients of both modes agree."""
    gen = torch.Generator().manual_seed(1)
    online_norm = not kind.startswith("expand") and kind != "plain"
    for train in (False, True):
        kw = {"online_norm": True} if train and online_norm else {}
        chain = randomize(rs.make_block(kind, 8, 12, 3, 1, **kw), gen).to(DEVICE, dtype)
        chain.train(train)
        online = rs.set_mode(copy.deepcopy(chain), "online")
        x = torch.randn(3, 8, 15, 17, generator=gen, dtype=dtype).to(DEVICE).requires_grad_()
        with strict_fp32():
            y_chain, y_online = chain(x), online(x)
            # a random projection: y.square().sum() through a training-mode BN has gradient 0
            w = torch.randn(y_chain.shape, generator=gen, dtype=dtype).to(DEVICE)
            (g_chain,) = torch.autograd.grad((y_chain * w).sum(), x)
            (g_online,) = torch.autograd.grad((y_online * w).sum(), x)
        assert _relative(y_chain, y_online) <= tol, (kind, train)
        assert _relative(g_chain, g_online) <= tol * 10, (kind, train)


SHORT = [
    "trainer=gpu" if DEVICE == "cuda" else "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=4",
]


@pytest.mark.parametrize(
    "block, precision", [("repvgg", "32"), ("repvgg", "bf16-mixed"), ("dbb", "32")]
)
def test_fit_and_test_on_cuda(compose_train, tmp_path, precision, block):
    overrides = [f"trainer.precision={precision}", f"model.net.block={block}", "deploy=false"]
    cfg = compose_train(*SHORT, *overrides)
    metrics, objects = cli_train.train(cfg)
    assert objects["model"].device.type == DEVICE
    assert metrics["test/max_logit_diff"] < 1e-5  # strict fp32: not TF32's ~1e-4
    assert metrics["test/acc_deployed"] == metrics["test/acc"]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_gpu_checkpoint_deploys_on_a_cpu_only_process(compose_train, tmp_path):
    """A checkpoint written by a GPU run holds CUDA tensors; deploy.py must load it with
    map_location="cpu" in a process where CUDA is invisible, verify and write artifacts."""
    cli_train.train(compose_train(*SHORT, "deploy=false"))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True, map_location="cpu") is not None
    saved = torch.load(ckpt, weights_only=True)  # the tensors come back on the GPU
    assert next(iter(saved["state_dict"].values())).device.type == DEVICE
    out = tmp_path / "deployed"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "deploy.py"),
            f"ckpt_path={ckpt}",
            f"output_dir={out}",
            "data=digits",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "deployed.pt").is_file()
    payload = torch.load(out / "deployed.pt", weights_only=True)
    assert all(t.device.type == "cpu" for t in payload["state_dict"].values())
