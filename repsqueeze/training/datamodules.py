"""LightningDataModules for the data of :mod:`repsqueeze.training.data`.

- :class:`DigitsDataModule`: scikit-learn's embedded 8x8 handwritten digits (no download),
  small enough for tests and CPU smoke runs.
- :class:`CIFARDataModule` (:class:`CIFAR10DataModule`, :class:`CIFAR100DataModule`):
  torchvision CIFAR-10 / CIFAR-100 with the standard crop-and-flip augmentation.
- :class:`ImageFolderDataModule`: any ``ImageFolder`` tree with ImageNet-style transforms.

Each is its Lightning-free class of :mod:`repsqueeze.training.data` (arguments, splits,
loaders, input shape: see there) on Lightning's ``LightningDataModule``, its constructor
arguments recorded as hyperparameters. :func:`example_batch` returns one real batch, e.g. to
check a deployed model against its training form.
"""

from __future__ import annotations

import inspect

from lightning.pytorch import LightningDataModule

from repsqueeze.training.data import (
    CIFAR10Data,
    CIFAR100Data,
    CIFARData,
    DigitsData,
    ImageFolderData,
    example_batch,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "example_batch",
]


class _Hyperparameters:
    """Placed before a plain data class: records its constructor's arguments as Lightning
    hyperparameters (``hparams``, saved in checkpoints and given to the loggers)."""

    def _keep_arguments(self) -> None:
        self.save_hyperparameters(frame=inspect.currentframe().f_back)


class DigitsDataModule(_Hyperparameters, DigitsData, LightningDataModule):
    """:class:`~repsqueeze.training.data.DigitsData` as a LightningDataModule."""


class CIFARDataModule(_Hyperparameters, CIFARData, LightningDataModule):
    """:class:`~repsqueeze.training.data.CIFARData` as a LightningDataModule."""


class CIFAR10DataModule(CIFAR10Data, CIFARDataModule):
    """:class:`~repsqueeze.training.data.CIFAR10Data` as a LightningDataModule."""


class CIFAR100DataModule(CIFAR100Data, CIFARDataModule):
    """:class:`~repsqueeze.training.data.CIFAR100Data` as a LightningDataModule."""


class ImageFolderDataModule(_Hyperparameters, ImageFolderData, LightningDataModule):
    """:class:`~repsqueeze.training.data.ImageFolderData` as a LightningDataModule."""
