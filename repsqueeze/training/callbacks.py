"""The training-vs-deployed check, as a Lightning callback: at test time the network is
deployed once (:func:`repsqueeze.surgery.deploy`), both forms run on every test batch, and
the deployed form must compute the same logits.

:class:`repsqueeze.training.lit.Classifier` adds its :class:`DeployCheck` to every trainer
it runs in (``configure_callbacks``); the deployed network of the last test stays in
:attr:`DeployCheck.deployed`, so a training run saves the network it checked instead of
deploying it again.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from repsqueeze.core.numerics import describe_fp32, strict_fp32
from repsqueeze.surgery import deploy


def dtype_of(net: nn.Module) -> torch.dtype:
    """The dtype of ``net``'s first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)


class DeployCheck(Callback):
    """Deploys ``pl_module.net`` when the test starts and compares the deployed form with
    the training form on every test batch.

    The module's ``test_step`` returns the training form's logits, computed eagerly in the
    parameters' own precision with autocast and TF32 off
    (:func:`repsqueeze.core.numerics.strict_fp32`); the deployed form runs the same way here. On
    Ampere and later GPUs cuDNN would otherwise round float32 convolutions to TF32 (about
    1e-4 relative), which is not a deploy error.

    Logs ``test/acc_deployed`` and ``test/max_logit_diff``: the largest absolute logit
    difference over the test set divided by the largest absolute logit (reduced over all
    processes). A difference above ``tolerance`` (or NaN) raises ``RuntimeError``.

    Args:
        tolerance: the largest relative logit difference the deployed form may show.

    Attributes:
        deployed: the deployed network of the last test (or of :meth:`deploy`), else ``None``.
    """

    def __init__(self, tolerance: float = 1e-4) -> None:
        self.tolerance = tolerance
        self.deployed: nn.Module | None = None
        self._sums: dict[str, Tensor] = {}

    def deploy(self, net: nn.Module) -> nn.Module:
        """Deploys a copy of ``net`` (eval mode, no gradients), keeps it as :attr:`deployed`
        and returns it."""
        self.deployed = deploy(net).eval().requires_grad_(False)
        return self.deployed

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.deploy(pl_module.net)
        with strict_fp32():
            precision = describe_fp32()
        dtype = dtype_of(pl_module.net)
        if dtype != torch.float32:
            precision = f"parameters in {dtype}"
        rank_zero_info(f"Deploy check (training vs deployed form): autocast off, {precision}")
        zero = torch.zeros((), device=pl_module.device)
        self._sums = {"diff": zero, "logit": zero, "correct": zero, "count": zero}

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        x, y = batch
        x = x.to(dtype_of(pl_module.net)) if x.is_floating_point() else x
        with torch.no_grad(), strict_fp32(), torch.autocast(x.device.type, enabled=False):
            deployed = self.deployed(x).float()  # (N, num_classes)
        logits = outputs.detach().float()
        sums = self._sums
        sums["diff"] = torch.maximum(sums["diff"], (logits - deployed).abs().max())
        sums["logit"] = torch.maximum(sums["logit"], logits.abs().max())
        sums["correct"] = sums["correct"] + (deployed.argmax(dim=1) == y).sum()
        sums["count"] = sums["count"] + y.numel()

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        reduce = trainer.strategy.reduce
        max_diff = reduce(self._sums["diff"], reduce_op="max")
        scale = reduce(self._sums["logit"], reduce_op="max")
        scale = scale.clamp_min(torch.finfo(torch.float32).tiny)
        correct = reduce(self._sums["correct"], reduce_op="sum")
        count = reduce(self._sums["count"], reduce_op="sum").clamp_min(1)
        relative = max_diff / scale
        pl_module.log("test/acc_deployed", correct / count, sync_dist=True)  # equal on every rank
        pl_module.log("test/max_logit_diff", relative, sync_dist=True, reduce_fx="max")
        if not relative <= self.tolerance:  # NaN fails too
            raise RuntimeError(
                f"deployed model differs from the training form: max |logit difference| = "
                f"{max_diff.item():.3g}, {relative.item():.3g} of the largest |logit| "
                f"{scale.item():.3g}, above deploy_tolerance={self.tolerance}"
            )
