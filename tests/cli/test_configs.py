"""The Hydra configs compose, and every option of every group instantiates.

Each test composes the real ``configs/train.yaml`` with outputs in ``tmp_path``; datamodules
are instantiated but never set up (CIFAR and ImageFolder data are not needed).
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from repsqueeze.cli import runs
from repsqueeze.cli import train as cli_train
from repsqueeze.cli.errors import one_line
from repsqueeze.cli.preflight import net_from_data
from repsqueeze.models import list_models
from repsqueeze.training.lit import Classifier
from repsqueeze.zoo import BLOCKS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
GROUPS = ["data", "model", "block", "trainer", "optimizer", "scheduler", "logger", "callbacks"]
GROUPS += ["experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def _instantiate_run(cfg: DictConfig) -> dict:
    """Instantiates everything ``train.train`` would, without fitting."""
    trainer_cfg = cfg.trainer
    if trainer_cfg.accelerator == "gpu" and not torch.cuda.is_available():
        trainer_cfg = trainer_cfg.copy()
        trainer_cfg.accelerator = "cpu"
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    datamodule = instantiate(cfg.data)
    from_data = net_from_data(cfg, datamodule)
    model = instantiate(cfg.model, net=from_data)
    optim = model.configure_optimizers()
    return {
        "datamodule": datamodule,
        "from_data": from_data,
        "model": model,
        "optim": optim,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False),
    }


def test_default_config(compose_train):
    cfg = compose_train(quiet=False)
    assert cfg.data._target_.endswith("DigitsDataModule")
    assert cfg.model.net == {
        "name": "digits_net",
        "block": "repvgg",
        "num_classes": None,  # the data module's, given when the model is built
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
    cfg = compose_train(f"{group}={option}", *classes, quiet=False)
    if group == "experiment" and cfg.model.net.name not in list_models():
        pytest.skip(f"model {cfg.model.net.name} is not registered")
    objects = _instantiate_run(cfg)
    datamodule, model = objects["datamodule"], objects["model"]
    assert isinstance(datamodule, LightningDataModule)
    assert isinstance(model, Classifier)
    assert isinstance(objects["trainer"], Trainer)
    assert all(isinstance(c, Callback) for c in objects["callbacks"])
    assert all(isinstance(lg, Logger) for lg in objects["loggers"])
    net_config = {**cfg.model.net, **objects["from_data"]}
    assert model.hparams.net_config == net_config  # plain, rebuildable, saved in checkpoints
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


def test_block_group_holds_every_kind_and_refuses_others_when_composing(compose_train):
    assert {p.stem for p in (CONFIG_DIR / "block").glob("*.yaml")} == set(BLOCKS)
    for kind in BLOCKS:
        assert compose_train(f"block={kind}").model.net.block == kind
    with pytest.raises(MissingConfigException) as info:
        compose_train("block=dbbb")
    kinds = ", ".join(sorted(BLOCKS))
    assert one_line(info.value) == f"block=dbbb: must be one of {kinds} (did you mean dbb?)"


def test_a_model_net_block_override_still_sets_the_kind(compose_train):
    assert compose_train("model.net.block=acb").model.net.block == "acb"
    assert compose_train("block=dbb", "model.net.block=acb").model.net.block == "acb"


def test_experiments_change_only_what_they_say(compose_train):
    cfg = compose_train("experiment=dbb_cifar100")
    assert cfg.data._target_.endswith("CIFAR100DataModule")
    assert cfg.model.net.block == "dbb"
    assert net_from_data(cfg, instantiate(cfg.data)) == {"num_classes": 100, "in_channels": 3}
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.scheduler.T_max == cfg.trainer.max_epochs == 200
    assert compose_train("experiment=expandnet_cifar10").model.net.block == "expand_ck"
    repvgg = compose_train("experiment=repvgg_cifar10").model.net
    assert repvgg.name == "repvgg_a0" and repvgg.cifar_stem


def test_none_options_are_null(compose_train):
    cfg = compose_train("scheduler=none", "logger=none", "callbacks=none", quiet=False)
    assert cfg.scheduler is None and cfg.logger is None and cfg.callbacks is None
    assert _instantiate_run(cfg)["model"].scheduler_factory is None


def test_sweep_settings(compose_train):
    cfg = compose_train(hydra=True)
    assert cfg.optimized_metric == "val/acc_best"
    target = cfg.hydra.callbacks.compare_jobs._target_
    assert target == "repsqueeze.cli.train.CompareJobs"
    assert isinstance(instantiate(cfg.hydra.callbacks.compare_jobs), cli_train.CompareJobs)
