"""LightningDataModules for the datasets repsqueeze trains and verifies on.

- :class:`DigitsDataModule`: scikit-learn's embedded 8x8 handwritten digits (no download),
  small enough for tests and CPU smoke runs.
- :class:`CIFARDataModule`: torchvision CIFAR-10 / CIFAR-100 with the standard crop-and-flip
  augmentation (He et al., "Deep Residual Learning for Image Recognition", 2016).
- :class:`ImageFolderDataModule`: any ``ImageFolder`` tree with ImageNet-style transforms.

Training augmentation is torchvision's ``transforms.v2`` (:func:`train_transform`): a
crop and flip, one of RandAugment / TrivialAugment / AutoAugment (``auto_augment``),
RandomErasing (``random_erasing``), and MixUp / CutMix on whole batches (``mixup_alpha``,
``cutmix_alpha``: the training loader then yields soft targets ``(N, num_classes)``, which
:class:`repsqueeze.lit.Classifier` trains on). Evaluation uses the standard resize and
centre crop (:func:`eval_transform`).

Validation splits carved out of a training set never see training augmentation: the split
indices are shared, and each side applies its own transform to the untransformed images.
:func:`example_batch` returns one real batch, e.g. to check a deployed model against its
training form.

Arguments that cannot work, and data that is missing or unreadable, raise :class:`ConfigError`
naming the argument to change (``batch_size``, ``download``, ``root``) or the file at fault,
so an entry point can turn it into one line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate, random_split
from torchvision import datasets
from torchvision.transforms import v2

from repsqueeze.errors import ConfigError

CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUTO_AUGMENT = ("randaugment", "trivialaugment", "autoaugment")


class DataNotFoundError(ConfigError, FileNotFoundError):
    """The data is not where the arguments point (also a ``FileNotFoundError``)."""


class _TransformedSubset(Dataset):
    """The ``indices`` of an untransformed ``dataset``, seen through ``transform``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform: Callable) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        image, target = self.dataset[self.indices[i]]
        return self.transform(image), target


def policy(
    auto_augment: str | None, magnitude: int = 9, autoaugment_policy: str = "imagenet"
) -> list[v2.Transform]:
    """The automatic augmentation ``auto_augment`` names: ``"randaugment"`` (2 ops of
    ``magnitude``), ``"trivialaugment"`` (TrivialAugmentWide), ``"autoaugment"`` (the
    ``autoaugment_policy`` policy: imagenet, cifar10 or svhn), or ``None`` (none).

    Raises:
        ConfigError: an unknown name, naming ``auto_augment``.
    """
    if auto_augment is None:
        return []
    if auto_augment == "randaugment":
        return [v2.RandAugment(num_ops=2, magnitude=magnitude)]
    if auto_augment == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    if auto_augment == "autoaugment":
        return [v2.AutoAugment(v2.AutoAugmentPolicy(autoaugment_policy))]
    raise ConfigError(f"expected one of {[*AUTO_AUGMENT, None]}", "auto_augment", auto_augment)


def _check_probability(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigError("must be in [0, 1]", key, value)


def train_transform(
    crop: list[v2.Transform],
    mean: Sequence[float],
    std: Sequence[float],
    auto_augment: str | None = None,
    random_erasing: float = 0.0,
    magnitude: int = 9,
    autoaugment_policy: str = "imagenet",
) -> v2.Compose:
    """``crop`` (on the PIL image or uint8 tensor), the ``auto_augment`` policy, conversion
    to float in [0, 1], ``Normalize(mean, std)``, then ``RandomErasing(p=random_erasing)``."""
    _check_probability("random_erasing", random_erasing)
    erase = [v2.RandomErasing(p=random_erasing)] if random_erasing > 0 else []
    return v2.Compose(
        [
            *crop,
            v2.ToImage(),
            *policy(auto_augment, magnitude, autoaugment_policy),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
            *erase,
        ]
    )


def eval_transform(
    mean: Sequence[float],
    std: Sequence[float],
    image_size: int | None = None,
    crop_pct: float = 0.875,
    interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
) -> v2.Compose:
    """Resize to ``image_size / crop_pct`` and centre-crop ``image_size`` (the standard
    ImageNet evaluation: 256 then 224), or none of it without ``image_size``; then
    conversion to float and ``Normalize(mean, std)``."""
    resize = []
    if image_size is not None:
        resize = [v2.Resize(int(image_size / crop_pct), interpolation), v2.CenterCrop(image_size)]
    return v2.Compose(
        [*resize, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )


class MixCollate:
    """A DataLoader ``collate_fn``: stacks a batch, then mixes it with MixUp or CutMix (one
    of them, chosen per batch, when both are on); labels become probabilities
    ``(N, num_classes)``.

    Args:
        num_classes: classes of the labels.
        mixup_alpha: Beta-distribution parameter of MixUp; 0: no MixUp.
        cutmix_alpha: Beta-distribution parameter of CutMix; 0: no CutMix.
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> None:  # fmt: skip
        mixers = []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not mixers:
            raise ValueError("MixCollate needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mix = mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    def __call__(self, samples: list[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = default_collate(samples)  # (N, C, H, W), (N,)
        return self.mix(x, y)  # (N, C, H, W), (N, num_classes)


def _split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)`` into ``n - val_size`` train and ``val_size`` val indices."""
    if not 0 <= val_size < n:
        raise ConfigError(f"must be in [0, {n}) for {n} training samples", "val_size", val_size)
    generator = torch.Generator().manual_seed(seed)
    train, val = random_split(range(n), [n - val_size, val_size], generator=generator)
    return list(train.indices), list(val.indices)


class _DataModule(LightningDataModule):
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError("must be a positive integer", "batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError("must be an integer >= 0", "num_workers", num_workers)
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


class DigitsDataModule(_DataModule):
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
        _check_probability("random_erasing", random_erasing)
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
        self.save_hyperparameters()
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
        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
        y = torch.as_tensor(digits.target, dtype=torch.long)
        n = len(y)
        n_test, n_val = round(self.test_fraction * n), round(self.val_fraction * n)
        rest, test = train_test_split(
            np.arange(n), test_size=n_test, stratify=digits.target, random_state=self.seed
        )
        train, val = train_test_split(
            rest, test_size=n_val, stratify=digits.target[rest], random_state=self.seed
        )
        train, val, test = (torch.as_tensor(i, dtype=torch.long) for i in (train, val, test))
        raw = x
        if self.normalize:
            self.mean, self.std = x[train].mean().item(), x[train].std().item()
            x = (x - self.mean) / self.std
        self.train_set = TensorDataset(x[train], y[train])
        if self.crop_padding or self.auto_augment or self.random_erasing:
            crop = [v2.RandomCrop(8, padding=self.crop_padding)] if self.crop_padding else []
            mean, std = (self.mean, self.std) if self.normalize else (0.0, 1.0)
            transform = train_transform(crop, [mean], [std], self.auto_augment, self.random_erasing)
            pairs = TensorDataset(raw[train], y[train])
            self.train_set = _TransformedSubset(pairs, range(len(train)), transform)
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])


class CIFARDataModule(_DataModule):
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
            raise ConfigError(
                f"unknown CIFAR name; expected one of {list(CIFAR_STATS)}", "name", name
            )
        self.save_hyperparameters()
        self.data_dir = str(data_dir)
        self.name = name
        self.download = download
        self.val_size = val_size
        self.augment = augment
        self.num_classes = 10 if name == "cifar10" else 100
        self.dataset_cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        self.eval_transform = eval_transform(*CIFAR_STATS[name])
        crop = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if augment else []
        self.train_transform = train_transform(
            crop, *CIFAR_STATS[name], auto_augment, random_erasing, randaugment_magnitude, "cifar10"
        )

    @property
    def _label(self) -> str:
        return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[self.name]

    def _dataset(self, train: bool, transform: Callable | None) -> Dataset:
        folder = Path(self.data_dir) / self.dataset_cls.base_folder
        try:
            return self.dataset_cls(self.data_dir, train=train, transform=transform)
        except RuntimeError as err:
            problem = "incomplete or corrupted" if folder.is_dir() else "missing"
            raise DataNotFoundError(
                f"{self._label}: {folder}/ is {problem} (without network access, first place "
                f"{self.dataset_cls.filename} from {self.dataset_cls.url} in {self.data_dir})",
                "download",
                self.download,
                fix=True,
            ) from err

    def prepare_data(self) -> None:
        if not self.download:
            return
        for train in (True, False):
            try:
                self.dataset_cls(self.data_dir, train=train, download=True)
            except Exception as err:  # URLError, timeouts, md5 mismatches, tar errors ...
                raise ConfigError(
                    f"downloading {self._label} from {self.dataset_cls.url} failed "
                    f"({type(err).__name__}: {err}); without network access, place "
                    f"{self.dataset_cls.filename} (or its extracted {self.dataset_cls.base_folder}/) "
                    f"in {self.data_dir}",
                    "download",
                    self.download,
                ) from err

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._dataset(train=True, transform=None)
            train, val = _split_indices(len(full), self.val_size, self.seed)
            self.train_set = _TransformedSubset(full, train, self.train_transform)
            self.val_set = _TransformedSubset(full, val, self.eval_transform)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset(train=False, transform=self.eval_transform)


class CIFAR10DataModule(CIFARDataModule):
    """:class:`CIFARDataModule` with ``name="cifar10"``; takes the same other arguments."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(name="cifar10", **kwargs)


class CIFAR100DataModule(CIFARDataModule):
    """:class:`CIFARDataModule` with ``name="cifar100"``; takes the same other arguments."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(name="cifar100", **kwargs)


def load_image(path: str) -> Image.Image:
    """An RGB image, as ``ImageFolder``'s default loader reads it; an unreadable file raises
    :class:`ConfigError` naming it."""
    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for broken files
        raise ConfigError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err


class ImageFolderDataModule(_DataModule):
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
        self.save_hyperparameters()
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
            self.classes = self._find_classes(self._train_dir)
            self.num_classes = len(self.classes)

    @property
    def _split_layout(self) -> bool:
        return (self.root / "train").is_dir() and (self.root / "val").is_dir()

    @property
    def _train_dir(self) -> Path:
        return self.root / "train" if self._split_layout else self.root

    def _find_classes(self, path: Path) -> list[str]:
        try:
            return datasets.folder.find_classes(path)[0]
        except FileNotFoundError as err:  # no class sub-folder
            raise DataNotFoundError(
                f"{path} has no class sub-folders (expected {path}/<class>/<image>)",
                "root",
                str(self.root),
            ) from err

    def _folder(self, path: Path, transform: Callable | None) -> datasets.ImageFolder:
        self._find_classes(path)
        try:
            folder = datasets.ImageFolder(path, transform=transform, loader=load_image)
        except FileNotFoundError as err:  # a class folder without any image file
            raise DataNotFoundError(str(err), "root", str(self.root)) from err
        if self.classes is not None and folder.classes != self.classes:
            raise ConfigError(
                f"the classes of {path} differ from those of {self._train_dir}",
                "root",
                str(self.root),
            )
        return folder

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
            self.train_set = _TransformedSubset(full, range(len(full)), self.train_transform)
            return
        train, val = _split_indices(len(full), round(self.val_fraction * len(full)), self.seed)
        self.val_set = self.test_set = _TransformedSubset(full, val, self.eval_transform)
        self.train_set = _TransformedSubset(full, train, self.train_transform)


def example_batch(datamodule: LightningDataModule, stage: str = "test") -> tuple[Any, Any]:
    """One ``(x, y)`` batch of a datamodule, running ``prepare_data`` and ``setup`` first.

    Args:
        datamodule: Any LightningDataModule with train/val/test loaders.
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
