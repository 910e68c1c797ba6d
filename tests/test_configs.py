"""The Hydra configs compose, and every option of every group instantiates.

Each test composes the real ``configs/train.yaml`` with outputs in ``tmp_path``; datamodules
are instantiated but never set up (CIFAR and ImageFolder data are not needed).
"""

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from repsqueeze.cli import runs
from repsqueeze.models import list_models
from repsqueeze.training.lit import Classifier

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
_spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)
GROUPS = ["data", "model", "trainer", "optimizer", "scheduler", "logger", "callbacks"]
GROUPS += ["experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]
BLOCKS = ["plain", "repvgg", "acb", "dbb", "mobileone", "expand_ck", "expand_cl"]

Compose = Callable[..., DictConfig]


@pytest.fixture
def compose_train(tmp_path: Path) -> Iterator[Compose]:
    """``compose_train(*overrides)``: the train config, writing only under ``tmp_path``."""
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3")
    paths = [f"paths.{key}={tmp_path}" for key in ("root_dir", "log_dir", "output_dir")]

    def _compose(*overrides: str, hydra: bool = False) -> DictConfig:
        return compose("train", overrides=[*paths, *overrides], return_hydra_config=hydra)

    yield _compose
    GlobalHydra.instance().clear()


def _instantiate_run(cfg: DictConfig) -> dict:
    """Instantiates everything ``train.train`` would, without fitting."""
    trainer_cfg = cfg.trainer
    if trainer_cfg.accelerator == "gpu" and not torch.cuda.is_available():
        trainer_cfg = trainer_cfg.copy()
        trainer_cfg.accelerator = "cpu"
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    datamodule = instantiate(cfg.data)
    train_script.fill_from_data(cfg, datamodule)
    model = instantiate(cfg.model)
    optim = model.configure_optimizers()
    return {
        "datamodule": datamodule,
        "model": model,
        "optim": optim,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False),
    }


def test_default_config(compose_train):
    cfg = compose_train()
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.model.net == {
        "name": "digits_net",
        "block": "repvgg",
        "num_classes": None,  # filled in from the data module
        "in_channels": None,
        "pretrained": False,
        "online_norm": False,
    }
    assert cfg.model.mode == "chain"
    assert cfg.ckpt_path is None and cfg.test and cfg.deploy
    assert cfg.trainer.accelerator == "cpu"


def test_hydra_run_dir_under_log_dir(compose_train, tmp_path):
    cfg = compose_train(hydra=True)
    assert cfg.hydra.run.dir.startswith(f"{tmp_path}/train/runs/")
    assert cfg.hydra.run.dir.endswith(f"_{runs.run_id()}")
    assert cfg.hydra.sweep.dir.endswith(f"_{runs.run_id()}")
    assert not cfg.hydra.job.chdir


def test_every_config_option_is_tested():
    assert {g for g, _ in OPTIONS} == set(GROUPS)
    for group in ("data", "model", "trainer", "optimizer", "scheduler", "logger", "experiment"):
        assert len([o for g, o in OPTIONS if g == group]) >= 2, group


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_instantiates(compose_train, group, option):
    # an ImageFolder root that does not exist tells no class count: give one
    folder = option == "imagefolder" or option.endswith("_imagenet")
    classes = ["model.net.num_classes=10"] if folder else []
    if group == "logger" and option in ("wandb", "mlflow") and not importlib.util.find_spec(option):
        pytest.skip(f"logger={option} needs pip install 'repsqueeze[{option}]'")
    cfg = compose_train(f"{group}={option}", *classes)
    if group == "experiment" and cfg.model.net.name not in list_models():
        pytest.skip(f"model {cfg.model.net.name} is not registered")
    objects = _instantiate_run(cfg)
    datamodule, model = objects["datamodule"], objects["model"]
    assert isinstance(datamodule, LightningDataModule)
    assert isinstance(model, Classifier)
    assert isinstance(objects["trainer"], Trainer)
    assert all(isinstance(c, Callback) for c in objects["callbacks"])
    assert all(isinstance(lg, Logger) for lg in objects["loggers"])
    assert model.hparams.net_config == cfg.model.net  # plain, rebuildable, saved in checkpoints
    assert type(model.hparams.net_config) is dict
    assert model.hparams.net_config["name"] in list_models()
    if not classes:  # classes and channels come from the data module
        assert datamodule.num_classes == model.hparams.num_classes
    assert datamodule.in_channels == model.hparams.net_config["in_channels"]
    if cfg.scheduler is None:
        assert isinstance(objects["optim"], torch.optim.Optimizer)
    else:
        per_step = cfg.scheduler._target_ == "repsqueeze.training.optim.warmup_schedule"
        assert objects["optim"]["lr_scheduler"]["interval"] == ("step" if per_step else "epoch")


@pytest.mark.parametrize("block", BLOCKS)
def test_block_knob(compose_train, block):
    cfg = compose_train(f"model.net.block={block}")
    assert _instantiate_run(cfg)["model"].hparams.net_config["block"] == block


def test_experiments_change_only_what_they_say(compose_train):
    cfg = compose_train("experiment=dbb_cifar100")
    assert cfg.data._target_.endswith("CIFAR100DataModule")
    assert cfg.model.net.block == "dbb"
    train_script.fill_from_data(cfg, instantiate(cfg.data))
    assert (cfg.model.net.num_classes, cfg.model.net.in_channels) == (100, 3)
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.scheduler.T_max == cfg.trainer.max_epochs == 200
    assert compose_train("experiment=expandnet_cifar10").model.net.block == "expand_ck"
    repvgg = compose_train("experiment=repvgg_cifar10").model.net
    assert repvgg.name == "repvgg_a0" and repvgg.cifar_stem


def test_none_options_are_null(compose_train):
    cfg = compose_train("scheduler=none", "logger=none", "callbacks=none")
    assert cfg.scheduler is None and cfg.logger is None and cfg.callbacks is None
    assert _instantiate_run(cfg)["model"].scheduler_factory is None


def test_sweep_settings(compose_train):
    cfg = compose_train(hydra=True)
    assert cfg.optimized_metric == "val/acc_best"
    assert cfg.hydra.callbacks.compare_jobs._target_ == "__main__.CompareJobs"
    assert hasattr(train_script, "CompareJobs")
