"""Train a classifier built from re-parameterizable blocks, test it, deploy it, compare.

    python train.py                                            # digits on CPU, about a minute
    python train.py model.net.block=dbb trainer.max_epochs=5   # any block kind
    python train.py experiment=repvgg_cifar10 trainer=gpu
    python train.py trainer=ddp trainer.accelerator=cpu trainer.devices=2
    python train.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume

The run directory gets ``checkpoints/{best,last}.ckpt`` and ``deployed.pt`` (the deployed
network's weights plus its ``net_config``: ``repsqueeze.load_deployed`` rebuilds it without
the training branches). ``deploy.py`` turns a checkpoint into verified TorchScript and ONNX.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig
from torch import nn

from repsqueeze.convert import deploy
from repsqueeze.export import count_params, latency_ms, save_deployed


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fits, tests the best checkpoint (training and deployed form), deploys and saves.

    Args:
        cfg: the composed ``configs/train.yaml``.

    Returns:
        ``(metrics, objects)``: the logged metrics plus the deploy summary, and the
        datamodule, model, trainer and deployed network (``None`` when not deployed here).
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    _check_num_classes(datamodule, model)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = _metrics(trainer)
    _load_best(trainer, model)
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule)
        metrics.update(_metrics(trainer))

    deployed = None
    if cfg.get("deploy") and trainer.is_global_zero:
        deployed, summary = _deploy_and_compare(model, datamodule, metrics, cfg.paths.output_dir)
        metrics.update(summary)
    objects = {"datamodule": datamodule, "model": model, "trainer": trainer, "deployed": deployed}
    return metrics, objects


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: v.item() for k, v in trainer.callback_metrics.items()}


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiates every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    return [instantiate(c) for c in (group or {}).values() if c and "_target_" in c]


def _check_num_classes(datamodule: L.LightningDataModule, model: L.LightningModule) -> None:
    expected = getattr(datamodule, "num_classes", None)
    if expected is not None and expected != model.hparams.num_classes:
        raise ValueError(
            f"{type(datamodule).__name__} has {expected} classes but the model predicts "
            f"{model.hparams.num_classes}; set model.net.num_classes={expected}"
        )


def _load_best(trainer: L.Trainer, model: L.LightningModule) -> None:
    """Loads the best checkpoint's weights into ``model``; keeps the current ones without one."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    if not path:
        rank_zero_info(
            "No best checkpoint (fast_dev_run or no ModelCheckpoint): using current weights"
        )
        return
    rank_zero_info(f"Loading the best checkpoint: {path}")
    checkpoint = torch.load(path, map_location=model.device, weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])


def _deploy_and_compare(
    model: L.LightningModule, datamodule: L.LightningDataModule, metrics: dict, output_dir: str
) -> tuple[nn.Module, dict[str, float]]:
    """Deploys a CPU copy of ``model.net``, saves it, and prints training vs deployed form."""
    net = copy.deepcopy(model.net).cpu().eval()
    deployed = deploy(net).eval()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_deployed(deployed, out / "deployed.pt", model.hparams.net_config)

    size = getattr(datamodule, "image_size", None) or 32
    x = torch.randn(1, datamodule.in_channels, size, size)
    summary = {
        "params": count_params(net),
        "params_deployed": count_params(deployed),
        "latency_ms": latency_ms(lambda: net(x), repeats=30, warmup=5),
        "latency_ms_deployed": latency_ms(lambda: deployed(x), repeats=30, warmup=5),
    }
    rows = [
        ("parameters", f"{summary['params']:,}", f"{summary['params_deployed']:,}"),
        ("CPU latency, batch 1", f"{summary['latency_ms']:.3f} ms", f"{summary['latency_ms_deployed']:.3f} ms"),
        ("test accuracy", _fmt(metrics.get("test/acc")), _fmt(metrics.get("test/acc_deployed"))),
        ("max logit diff (rel.)", "", _fmt(metrics.get("test/max_logit_diff"), ".2e")),
    ]  # fmt: skip
    lines = [f"{'':<24}{'training form':>16}{'deployed':>16}", "-" * 56]
    lines += [f"{name:<24}{a:>16}{b:>16}" for name, a, b in rows]
    print("\n".join(["", *lines, f"saved {out / 'deployed.pt'}", ""]))
    return deployed, summary


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
