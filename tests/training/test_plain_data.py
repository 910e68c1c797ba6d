"""The Lightning-free data classes of repsqueeze.training.data against the data modules built
on them: one list of them, the same arguments, the same batches, and deploy.py's choice."""

import inspect

import torch
from lightning.pytorch import LightningDataModule
from omegaconf import OmegaConf

from repsqueeze.cli.deploy import build_data
from repsqueeze.training import datamodules
from repsqueeze.training.data import PLAIN_DATA, DigitsData, example_batch

MODULES = {
    f"{cls.__module__}.{cls.__name__}": cls
    for cls in vars(datamodules).values()
    if isinstance(cls, type) and issubclass(cls, LightningDataModule)
    and cls.__module__ == datamodules.__name__
}  # fmt: skip


def test_every_data_module_has_its_plain_class_with_the_same_arguments():
    assert set(PLAIN_DATA) == set(MODULES)
    for target, module in MODULES.items():
        plain = PLAIN_DATA[target]
        assert issubclass(module, plain) and not issubclass(plain, LightningDataModule), target
        assert inspect.signature(module) == inspect.signature(plain), target


def test_the_plain_class_gives_the_data_modules_batches_and_hyperparameters():
    plain, module = DigitsData(batch_size=8, seed=3), datamodules.DigitsDataModule(batch_size=8, seed=3)  # fmt: skip
    for stage in ("train", "test"):
        for a, b in zip(example_batch(plain, stage), example_batch(module, stage), strict=True):
            assert torch.equal(a, b), stage
    assert (plain.in_channels, plain.image_size, plain.num_classes) == (1, 8, 10)
    assert module.hparams["batch_size"] == 8 and module.hparams["seed"] == 3
    assert not hasattr(plain, "hparams")


def test_deploy_builds_the_plain_class_of_a_shipped_data_module_and_any_other_as_is():
    shipped = OmegaConf.create({"_target_": "repsqueeze.training.datamodules.DigitsDataModule", "batch_size": 4})  # fmt: skip
    data = build_data(shipped)
    assert type(data) is DigitsData and data.batch_size == 4
    assert shipped._target_ == "repsqueeze.training.datamodules.DigitsDataModule"  # not edited
    own = build_data(OmegaConf.create({"_target_": "collections.Counter", "a": 2}))
    assert own == {"a": 2}
