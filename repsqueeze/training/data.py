"""The data repsqueeze trains and verifies on, as plain classes: arguments, splits, loaders.

:class:`DigitsData` (scikit-learn's embedded 8x8 digits, no download), :class:`CIFARData`
(torchvision CIFAR-10 / CIFAR-100 with crop-and-flip augmentation, He et al. 2016) and
:class:`ImageFolderData` (an ``ImageFolder`` tree, ImageNet-style transforms) have the hooks
of a LightningDataModule (``prepare_data``, ``setup``, ``*_dataloader``) and the input shape
(``in_channels``, ``image_size``, ``num_classes``); :mod:`repsqueeze.training.datamodules`
adds only Lightning's base class. This module imports neither Lightning nor torchmetrics:
deploy.py builds the plain class of a data module target (:data:`PLAIN_DATA`) to draw
a real batch (:func:`example_batch`) without their import time. With ``mixup_alpha`` or
``cutmix_alpha`` the training loader yields soft targets ``(N, num_classes)``. Arguments that
cannot work raise :class:`~repsqueeze.training.datasets.ConfigError` naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from repsqueeze.training.datasets import (
    CIFAR_STATS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConfigError,
    DataNotFoundError,
    MixCollate,
    TransformedSubset,
    check_probability,
    cifar_set,
    digits_splits,
    download_cifar,
    eval_transform,
    find_classes,
    image_folder,
    policy,
    split_indices,
    train_transform,
)


def _check_count(key: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        rule = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ConfigError(f"must be {rule}", key, value)


class _Data:
    """Holds the three splits and builds their loaders; subclasses fill them in ``setup``."""

    def __init__(
        self,
        batch_size: int,
        num_workers: int,
        seed: int,
        pin_memory: bool,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ) -> None:
        super().__init__()
        _check_count("batch_size", batch_size, 1)
        _check_count("num_workers", num_workers, 0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not value >= 0:
                raise ConfigError("must be >= 0 (0: off)", key, value)
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _keep_arguments(self) -> None:
        """Called once the arguments are checked: a Lightning data module records them here."""

    def prepare_data(self) -> None:
        """Downloads what is missing (where the data set can be downloaded)."""

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a loader")
        collate = None
        if shuffle and (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            collate = MixCollate(self.num_classes, self.mixup_alpha, self.cutmix_alpha)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class DigitsData(_Data):
    """scikit-learn's 1797 8x8 grey-scale digits, split train/val/test with stratification.

    Pixels are scaled to [0, 1] and, with ``normalize``, standardised with the training
    split's mean and std (stored as ``mean`` / ``std`` after ``setup``).

    Args:
        batch_size: Samples per batch.
        val_fraction: Fraction of all samples held out for validation.
        test_fraction: Fraction of all samples held out for testing.
        seed: Seed of the split and of the training shuffle.
        num_workers: DataLoader worker processes.
        normalize: Standardise with the training split's pixel mean and std.
        pin_memory: Pin batches in page-locked memory.
        crop_padding: RandomCrop(8, padding=crop_padding) on training images; 0: none.
        auto_augment: ``"randaugment"``, ``"trivialaugment"``, ``"autoaugment"`` or ``None``
            on training images (see :func:`policy`), applied to the [0, 1] pixels.
        random_erasing: probability of RandomErasing on a training image.
        mixup_alpha: MixUp on training batches (soft targets); 0: off.
        cutmix_alpha: CutMix on training batches (soft targets); 0: off.
    """

    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        normalize: bool = True,
        pin_memory: bool = False,
        crop_padding: int = 0,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory, mixup_alpha, cutmix_alpha)
        policy(auto_augment)  # an unknown name fails here
        check_probability("random_erasing", random_erasing)
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ConfigError("must be an integer >= 0", "crop_padding", crop_padding)
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < value < 1:
                raise ConfigError("must be in (0, 1)", key, value)
        if val_fraction + test_fraction >= 1:
            raise ConfigError(
                f"val_fraction + test_fraction must be < 1 (test_fraction={test_fraction}): "
                "nothing would be left to train on",
                "val_fraction",
                val_fraction,
            )
        self._keep_arguments()
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.normalize = normalize
        self.crop_padding = crop_padding
        self.auto_augment = auto_augment
        self.random_erasing = random_erasing
        self.mean: float | None = None
        self.std: float | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        transform = None
        if self.crop_padding or self.auto_augment or self.random_erasing:
            crop = [v2.RandomCrop(8, padding=self.crop_padding)] if self.crop_padding else []

            def transform(mean: float | None, std: float | None) -> v2.Compose:
                mean, std = (mean, std) if self.normalize else (0.0, 1.0)
                return train_transform(crop, [mean], [std], self.auto_augment, self.random_erasing)  # fmt: skip

        splits = digits_splits(self.val_fraction, self.test_fraction, self.seed, self.normalize, transform)  # fmt: skip
        self.train_set, self.val_set, self.test_set, self.mean, self.std = splits


class CIFARData(_Data):
    """torchvision CIFAR-10 or CIFAR-100; ``val_size`` images of the official train set
    are held out (seeded) for validation, and the official test set is the test split.

    Args:
        data_dir: Directory holding (or receiving) ``cifar-10-batches-py`` /
            ``cifar-100-python``.
        name: ``"cifar10"`` or ``"cifar100"``.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        download: Download the archive in ``prepare_data`` when it is missing.
        val_size: Training images held out for validation.
        seed: Seed of the train/val split and of the training shuffle.
        augment: RandomCrop(32, padding=4) + RandomHorizontalFlip on the training split.
        pin_memory: Pin batches in page-locked memory.
        auto_augment: ``"randaugment"``, ``"trivialaugment"``, ``"autoaugment"`` (with the
            CIFAR-10 policy) or ``None`` on training images (see :func:`policy`).
        random_erasing: probability of RandomErasing on a training image.
        mixup_alpha: MixUp on training batches (soft targets); 0: off.
        cutmix_alpha: CutMix on training batches (soft targets); 0: off.
        randaugment_magnitude: RandAugment's magnitude (0-30).
    """

    in_channels = 3
    image_size = 32

    def __init__(
        self,
        data_dir: str | Path = "data/",
        name: str = "cifar10",
        batch_size: int = 128,
        num_workers: int = 2,
        download: bool = False,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        pin_memory: bool = False,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        randaugment_magnitude: int = 9,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory, mixup_alpha, cutmix_alpha)
        if name not in CIFAR_STATS:
            raise ConfigError(f"unknown CIFAR name; expected one of {list(CIFAR_STATS)}", "name", name)  # fmt: skip
        self._keep_arguments()
        self.data_dir = str(data_dir)
        self.name = name
        self.download = download
        self.val_size = val_size
        self.augment = augment
        self.num_classes = 10 if name == "cifar10" else 100
        self.eval_transform = eval_transform(*CIFAR_STATS[name])
        crop = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
        self.train_transform = train_transform(
            crop, *CIFAR_STATS[name], auto_augment, random_erasing, randaugment_magnitude, "cifar10"
        )

    def _dataset(self, train: bool, transform: Callable | None) -> Dataset:
        return cifar_set(self.name, self.data_dir, train, transform, self.download)

    def prepare_data(self) -> None:
        if self.download:
            download_cifar(self.name, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._dataset(train=True, transform=None)
            train, val = split_indices(len(full), self.val_size, self.seed)
            self.train_set = TransformedSubset(full, train, self.train_transform)
            self.val_set = TransformedSubset(full, val, self.eval_transform)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset(train=False, transform=self.eval_transform)


class CIFAR10Data(CIFARData):
    """:class:`CIFARData` with ``name="cifar10"``; takes the same other arguments."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(name="cifar10", **kwargs)


class CIFAR100Data(CIFARData):
    """:class:`CIFARData` with ``name="cifar100"``; takes the same other arguments."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(name="cifar100", **kwargs)


class ImageFolderData(_Data):
    """An ``ImageFolder`` tree with ImageNet-style transforms.

    With ``root/train`` and ``root/val`` present those are the train and val splits
    (``root/test`` is the test split if present, else ``root/val``). Otherwise ``root`` itself
    is one ImageFolder, split with a seeded ``val_fraction`` that also serves as test split.
    ``num_classes`` is known from construction when ``root`` exists, else after ``setup``.
    An image that cannot be decoded raises :class:`ConfigError` naming its file when it is
    read.

    Args:
        root: Dataset directory.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        image_size: Side of the square crops fed to the model.
        val_fraction: Fraction held out for validation when ``root`` has no train/val split.
        seed: Seed of the train/val split and of the training shuffle.
        pin_memory: Pin batches in page-locked memory.
        auto_augment: ``"randaugment"``, ``"trivialaugment"``, ``"autoaugment"`` (ImageNet
            policy) or ``None`` on training images (see :func:`policy`).
        random_erasing: probability of RandomErasing on a training image.
        mixup_alpha: MixUp on training batches (soft targets); 0: off.
        cutmix_alpha: CutMix on training batches (soft targets); 0: off.
        randaugment_magnitude: RandAugment's magnitude (0-30).
        interpolation: ``"bilinear"`` or ``"bicubic"``: resampling of the training crop and
            the evaluation resize.
        crop_pct: evaluation centre crop as a fraction of the resized side (0.875: 256 -> 224).
    """

    in_channels = 3

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 64,
        num_workers: int = 2,
        image_size: int = 224,
        val_fraction: float = 0.1,
        seed: int = 0,
        pin_memory: bool = False,
        auto_augment: str | None = None,
        random_erasing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        randaugment_magnitude: int = 9,
        interpolation: str = "bilinear",
        crop_pct: float = 0.875,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory, mixup_alpha, cutmix_alpha)
        if interpolation not in ("bilinear", "bicubic"):
            raise ConfigError("expected 'bilinear' or 'bicubic'", "interpolation", interpolation)
        if not 0 < crop_pct <= 1:
            raise ConfigError("must be in (0, 1]", "crop_pct", crop_pct)
        if not 0 <= val_fraction < 1:
            raise ConfigError("must be in [0, 1)", "val_fraction", val_fraction)
        self._keep_arguments()
        self.root = Path(root)
        self.image_size = image_size
        self.val_fraction = val_fraction
        resample = v2.InterpolationMode(interpolation)
        crop = [v2.RandomResizedCrop(image_size, interpolation=resample), v2.RandomHorizontalFlip()]
        self.train_transform = train_transform(
            crop, IMAGENET_MEAN, IMAGENET_STD, auto_augment, random_erasing, randaugment_magnitude
        )
        self.eval_transform = eval_transform(
            IMAGENET_MEAN, IMAGENET_STD, image_size, crop_pct, resample
        )
        self.classes: list[str] | None = None
        self.num_classes: int | None = None
        if self.root.is_dir():
            self.classes = find_classes(self._train_dir, self.root)
            self.num_classes = len(self.classes)

    @property
    def _split_layout(self) -> bool:
        return (self.root / "train").is_dir() and (self.root / "val").is_dir()

    @property
    def _train_dir(self) -> Path:
        return self.root / "train" if self._split_layout else self.root

    def _folder(self, path: Path, transform: Callable | None) -> Dataset:
        return image_folder(path, self.root, transform, self.classes, self._train_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.root.is_dir():
            raise DataNotFoundError("no such directory", "root", str(self.root))
        self.classes = None
        full = self._folder(self._train_dir, transform=None)
        self.classes, self.num_classes = full.classes, len(full.classes)
        if self._split_layout:
            test_dir = self.root / "test" if (self.root / "test").is_dir() else self.root / "val"
            self.val_set = self._folder(self.root / "val", self.eval_transform)
            self.test_set = self._folder(test_dir, self.eval_transform)
            self.train_set = TransformedSubset(full, range(len(full)), self.train_transform)
            return
        train, val = split_indices(len(full), round(self.val_fraction * len(full)), self.seed)
        self.val_set = self.test_set = TransformedSubset(full, val, self.eval_transform)
        self.train_set = TransformedSubset(full, train, self.train_transform)


# The plain class of each data module of repsqueeze.training.datamodules by its dotted path
# (a config's _target_; a data module not listed is built with Lightning). A new data set is
# added here and as a data module there (a test checks that the two lists agree).
PLAIN_DATA: dict[str, type[_Data]] = {
    f"repsqueeze.training.datamodules.{cls.__name__}Module": cls
    for cls in (DigitsData, CIFARData, CIFAR10Data, CIFAR100Data, ImageFolderData)
}


def example_batch(datamodule: Any, stage: str = "test") -> tuple[Any, Any]:
    """One ``(x, y)`` batch of a datamodule, running ``prepare_data`` and ``setup`` first.

    Args:
        datamodule: A LightningDataModule, or any object with its hooks (the classes here).
        stage: ``"train"``, ``"val"`` or ``"test"``: the loader to draw from.
    """
    loaders = {
        "train": ("fit", "train_dataloader"),
        "val": ("fit", "val_dataloader"),
        "test": ("test", "test_dataloader"),
    }
    if stage not in loaders:
        raise ValueError(f"stage must be one of {list(loaders)}, got {stage!r}")
    setup_stage, loader_name = loaders[stage]
    datamodule.prepare_data()
    datamodule.setup(setup_stage)
    x, y = next(iter(getattr(datamodule, loader_name)()))
    return x, y
