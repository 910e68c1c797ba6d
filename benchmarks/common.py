"""What every benchmark shares: BatchNorm statistics made random, progress bars, optional
timm, and the run's environment as the results record it."""

from __future__ import annotations

import platform
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from repsqueeze.zoo import BLOCKS

KINDS = list(BLOCKS)
PLAIN = "hand-written plain"
NOTES: dict[str, list[str]] = {}  # section -> lines printed under its table


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters (folding is then real arithmetic);
    returns ``model`` in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 2 - 1)
    return model.eval()


def progress(items: list, desc: str) -> tqdm:
    return tqdm(items, desc=desc, file=sys.stderr, mininterval=5, leave=False)


def has_timm() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def command() -> str | None:
    """The script run from the command line (``python benchmarks/run.py ...``); ``None``
    when a benchmark is called as a library."""
    return " ".join(["python", *sys.argv]) if sys.argv[0].endswith(".py") else None


def environment(device: str, quick: bool) -> dict:
    """Where and how a run measured: date, versions, CPU/GPU, threads, TF32, cuDNN autotune."""
    cuda = device.startswith("cuda")
    return {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "quick": quick,
        "command": command(),
    }
