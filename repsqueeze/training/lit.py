"""The Lightning module: train a classifier built from re-parameterizable blocks, and at test
time check that its deployed form computes the same logits
(:class:`repsqueeze.training.callbacks.DeployCheck`).

The network is given either as a module or as its constructor config, a dict that
``repsqueeze.models.create_model(**config)`` takes (``{"name": "digits_net", "block": "dbb",
...}``; a ``_target_`` key is dropped). Only that config is saved as a hyperparameter
(``net_config``), so a checkpoint rebuilds the model without Hydra::

    model = Classifier.load_from_checkpoint("best.ckpt")            # training form
    net = create_model(**ckpt["hyper_parameters"]["net_config"])     # or just the network

Training-recipe knobs (see ``docs/training.md``): a per-step schedule with warmup
(:func:`repsqueeze.training.optim.warmup_schedule`), weight-decay rules and the RepVGG / DBB
regularisers (:mod:`repsqueeze.training.optim`), soft targets (MixUp / CutMix batches from
:mod:`repsqueeze.training.datasets`), ``channels_last``. EMA is Lightning's ``EMAWeightAveraging``
callback: it validates, checkpoints (``state_dict``) and leaves in the module after training
the averaged weights, so the best checkpoint, the test and the deployed network are the EMA's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from repsqueeze.core.numerics import strict_fp32
from repsqueeze.models import create_model
from repsqueeze.surgery import set_mode
from repsqueeze.training.callbacks import DeployCheck, dtype_of
from repsqueeze.training.optim import (
    Regularizer,
    dbb_identity_l2,
    repvgg_custom_l2,
    weight_decay_groups,
)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
_WEIGHT_SOURCES = ("pretrained", "pretrained_cfg_overlay")  # create_model's, not saved
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class Classifier(LightningModule):
    """Image classifier with cross-entropy loss, top-1 (and top-5) accuracy per stage, and a
    deployed-vs-training equivalence check on the test set.

    Training targets are class indices, or class probabilities ``(N, num_classes)`` (MixUp /
    CutMix batches): the loss is then the cross-entropy against them, and ``train/acc`` counts
    the predictions that hit the most probable class (the larger share of a mixed image).

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best``,
    ``test/loss``, ``test/acc`` (``*/acc_top5`` when there are more than 5 classes) and,
    through its :attr:`deploy_check` callback (:class:`DeployCheck`, added to every trainer
    the module runs in), ``test/acc_deployed`` and ``test/max_logit_diff``: the network is
    deployed once per test, both forms run eagerly with autocast and TF32 off, and a relative
    logit difference above ``deploy_tolerance`` raises ``RuntimeError``. After the test the
    checked deployed network is ``deploy_check.deployed``.

    Args:
        net: the network, or its ``create_model`` config (then saved as ``net_config``).
        optimizer: ``optimizer(params=...)`` builds the optimizer, e.g. a
            ``functools.partial(torch.optim.SGD, lr=0.1)``; only needed to train.
        scheduler: ``scheduler(optimizer=...)`` builds an LR scheduler, or ``None``. One that
            takes ``total_steps`` and ``steps_per_epoch`` (as
            :func:`repsqueeze.training.optim.warmup_schedule`) gets them from the trainer and is
            stepped after every optimizer step; any other is stepped once per epoch.
        num_classes: number of classes; taken from ``net_config`` when omitted.
        label_smoothing: label smoothing of the cross-entropy loss.
        deploy_tolerance: largest relative logit difference the deployed model may show.
        net_config: the ``create_model`` config of ``net`` when ``net`` is a module (saved for
            rebuilding), or instead of ``net`` (as when loading a checkpoint).
        mode: how every block runs while training: ``"chain"``, ``"online"`` (compose the
            kernel in the forward pass, one convolution per block) or ``"auto"``; ``None``
            keeps the blocks' own setting. See :meth:`repsqueeze.Squeezable.set_mode`.
        compile: ``True`` runs the network through ``torch.compile`` for training and
            validation; a mapping gives ``torch.compile``'s keyword arguments (e.g.
            ``{"mode": "max-autotune"}`` or ``{"backend": "eager"}``). The parameters stay
            in the uncompiled ``net`` (clean ``state_dict`` keys, no ``_orig_mod.``), and the
            test-time deploy check runs the uncompiled network.
        no_decay_norm_bias: no weight decay on normalisation layers, biases and per-channel
            scales (:func:`repsqueeze.training.optim.weight_decay_groups`); ``False`` decays every
            parameter with the optimizer's ``weight_decay``.
        repvgg_custom_l2: RepVGG's custom L2 on each block's equivalent kernel instead of
            weight decay on its two kernels (:func:`repsqueeze.training.optim.repvgg_custom_l2`),
            weighted by ``0.5 * weight_decay``.
        dbb_identity_l2: decay DBB's identity-initialised 1x1 on its difference from the
            identity (:func:`repsqueeze.training.optim.dbb_identity_l2`) instead of towards zero.
        channels_last: keep the network's 4-D weights and the inputs in channels-last
            memory format (faster convolutions on recent GPUs, above all with bf16).
    """

    def __init__(
        self,
        net: nn.Module | Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int | None = None,
        label_smoothing: float = 0.0,
        deploy_tolerance: float = 1e-4,
        net_config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        compile: bool | Mapping[str, Any] = False,
        no_decay_norm_bias: bool = False,
        repvgg_custom_l2: bool = False,
        dbb_identity_l2: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        net, net_config, num_classes = _network(net, net_config, num_classes)
        # every argument but the objects (as the resolved values above); net_config rebuilds net
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = set_mode(net, mode) if mode is not None else net
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.optimizer_factory = optimizer
        self.compile_options = compile  # also here: a callable backend is not a hyperparameter
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_metrics = _accuracies(num_classes, "train/")
        self.val_metrics = _accuracies(num_classes, "val/")
        self.test_metrics = _accuracies(num_classes, "test/")
        self.val_acc_best = MaxMetric()
        self.deploy_check = DeployCheck(deploy_tolerance)  # a callback, see configure_callbacks
        # Plain attributes, so they stay out of state_dict and checkpoints: the compiled
        # network (built in configure_model) and the regularisers (built with the optimizer).
        self.__dict__["compiled_net"] = None
        self.__dict__["regularizers"] = []

    def setup(self, stage: str) -> None:
        """Gives the model summary an example input (one image of the data module's shape),
        so that it counts FLOPs; not when compiling (the summary would compile once more)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        channels = getattr(datamodule, "in_channels", None)
        size = getattr(datamodule, "image_size", None)
        if self.example_input_array is None and not self.compile_options and channels and size:
            self.example_input_array = torch.zeros(1, channels, size, size)

    @property
    def example_input_array(self) -> Tensor | None:
        """The summary's example input, in the network's dtype at the time it is read (the
        precision plugin converts the network after :meth:`setup`, e.g. ``precision=64``)."""
        x = self._example_input_array
        return x if x is None else x.to(dtype_of(self.net))

    @example_input_array.setter
    def example_input_array(self, example: Tensor | None) -> None:
        self._example_input_array = example

    def configure_model(self) -> None:
        """Compiles ``net`` when ``compile`` is set (once; Lightning calls this per stage)."""
        options = self.compile_options
        if options and self.compiled_net is None:
            kwargs = dict(options) if isinstance(options, Mapping) else {}
            self.__dict__["compiled_net"] = torch.compile(self.net, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        net = self.compiled_net if self.compiled_net is not None else self.net
        if self.hparams.get("channels_last") and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x)  # (N, num_classes)

    def _step(self, batch: tuple[Tensor, Tensor], metrics: MetricCollection) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)  # y: (N,) class indices or (N, C) probabilities
        metrics(logits, y.argmax(dim=1) if y.ndim == 2 else y)
        self._log_stage(metrics, loss)
        return loss

    def _log_stage(self, metrics: MetricCollection, loss: Tensor) -> None:
        stage = metrics.prefix
        self.log(f"{stage}loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        for name, metric in metrics.items():
            self.log(name, metric, on_step=False, on_epoch=True, prog_bar=name == "val/acc")

    def on_fit_start(self) -> None:
        averaging = [c for c in self.trainer.callbacks if isinstance(c, WeightAveraging)]
        for callback in averaging:
            rank_zero_info(
                f"{type(callback).__name__}: validation, best-checkpoint selection, the "
                "checkpoints' state_dict and the weights left after training (tested and "
                "deployed) are the averaged weights; the raw ones are in the checkpoints' "
                "current_model_state"
            )

    def on_train_start(self) -> None:
        # The sanity-check validation must not count towards the best accuracy; a resumed
        # run starts from the best its checkpoint had reached.
        self.val_metrics.reset()
        self.val_acc_best.reset()
        best = self.__dict__.get("resumed_best")
        if best is not None and best > float("-inf"):
            self.val_acc_best.update(torch.tensor(best, device=self.device))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["val_acc_best"] = float(self.val_acc_best.max_value)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.__dict__["resumed_best"] = checkpoint.get("val_acc_best")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, self.train_metrics)
        if not self.regularizers:
            return loss
        weight_decay = self._weight_decay
        penalty = sum(r.term() for r in self.regularizers)
        self.log("train/l2", penalty, on_step=False, on_epoch=True, sync_dist=True)
        return loss + 0.5 * weight_decay * penalty

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_metrics["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Tests the training form and returns its logits, for :class:`DeployCheck` to
        compare with the deployed form's: eagerly, in the parameters' own precision, TF32 and
        autocast off (mixed-precision and TF32 noise is not a deploy error)."""
        x, y = batch
        x = x.to(dtype_of(self.net)) if x.is_floating_point() else x
        with strict_fp32(), torch.autocast(x.device.type, enabled=False):
            logits = self.net(x)  # (N, num_classes)
        self.test_metrics(logits, y)
        self._log_stage(self.test_metrics, self.criterion(logits, y))
        return logits

    def configure_callbacks(self) -> list[Callback]:
        """The training-vs-deployed check (:class:`DeployCheck`), in every trainer (once)."""
        return [] if self.deploy_check in self.trainer.callbacks else [self.deploy_check]

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("Classifier was built without an optimizer; pass one to train")
        regularizers = self._regularizers()
        covered = [p for r in regularizers for p in r.params]
        groups = weight_decay_groups(self.net, self.hparams.get("no_decay_norm_bias"), covered)
        optimizer = self.optimizer_factory(params=[g for g in groups if g["params"]])
        self.__dict__["regularizers"] = regularizers
        self._weight_decay = float(optimizer.defaults.get("weight_decay") or 0.0)
        if self.scheduler_factory is None:
            return optimizer
        interval = "epoch"
        if _takes_lengths(self.scheduler_factory):
            interval = "step"
            total, per_epoch = self._schedule_lengths()
            scheduler = self.scheduler_factory(
                optimizer=optimizer, total_steps=total, steps_per_epoch=per_epoch
            )
        else:
            scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "val/loss"},
        }

    def _regularizers(self) -> list[Regularizer]:
        found = []
        if self.hparams.get("repvgg_custom_l2"):
            found.append(repvgg_custom_l2(self.net))
        if self.hparams.get("dbb_identity_l2"):
            found.append(dbb_identity_l2(self.net))
        return found

    def _schedule_lengths(self) -> tuple[int, int]:
        """``(total, per_epoch)`` optimizer steps of the fit (``(1, 1)`` without a trainer,
        as when the optimizer is built once to check its arguments)."""
        trainer = self._trainer
        if trainer is None:
            return 1, 1
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "a per-step schedule needs a finite run: set trainer.max_epochs or "
                "trainer.max_steps"
            )
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return int(total), int(total)
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        return int(total), max(1, per_epoch)


def _takes_lengths(factory: Callable[..., Any]) -> bool:
    """Whether a scheduler factory takes ``total_steps`` and ``steps_per_epoch``."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "total_steps" in params and "steps_per_epoch" in params


def _accuracies(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 accuracy, plus top-5 when there are more than 5 classes, logged as ``{prefix}acc``."""
    metrics = {"acc": MulticlassAccuracy(num_classes, average="micro")}
    if num_classes > 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def _network(
    net: nn.Module | Mapping[str, Any] | None,
    net_config: Mapping[str, Any] | None,
    num_classes: int | None,
) -> tuple[nn.Module, dict[str, Any] | None, int]:
    """``(net, net_config, num_classes)`` from the arguments of :class:`Classifier`: the
    network built from its config when only that is given, the config without ``_target_``
    and without the weight sources (the checkpoint holds the weights), and the classes
    checked against the config's."""
    if isinstance(net, Mapping):
        net_config, net = net, None
    if net_config is not None:
        net_config = {k: v for k, v in net_config.items() if k != "_target_"}
    if net is None:
        if net_config is None:
            raise ValueError("Classifier needs net (a module or a create_model config)")
        net = create_model(**net_config)
    if net_config is not None:  # rebuilding from a checkpoint needs no weight file
        net_config = {k: v for k, v in net_config.items() if k not in _WEIGHT_SOURCES or not v}
    config_classes = (net_config or {}).get("num_classes")
    if num_classes is None:
        num_classes = config_classes
    if num_classes is None:
        raise ValueError("Classifier needs num_classes (or a net_config that has it)")
    if config_classes is not None and config_classes != num_classes:
        raise ValueError(f"num_classes={num_classes} but net_config has {config_classes}")
    return net, net_config, num_classes
