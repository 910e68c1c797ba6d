"""The data sets repsqueeze trains and verifies on, and their transforms, without Lightning.

- :func:`digits_splits`: scikit-learn's embedded 8x8 handwritten digits (no download),
  split train/val/test with stratification; small enough for tests and CPU smoke runs.
- :func:`cifar_set` / :func:`download_cifar`: torchvision CIFAR-10 / CIFAR-100.
- :func:`image_folder`: an ``ImageFolder`` tree whose unreadable images fail naming the file.

Training augmentation is torchvision's ``transforms.v2`` (:func:`train_transform`): a
crop and flip, one of RandAugment / TrivialAugment / AutoAugment (``auto_augment``),
RandomErasing (``random_erasing``), and MixUp / CutMix on whole batches
(:class:`MixCollate`: soft targets ``(N, num_classes)``). Evaluation uses the standard resize
and centre crop (:func:`eval_transform`). A validation split carved out of a training set
never sees training augmentation: :class:`TransformedSubset` applies each side's own
transform to the untransformed images.

The data classes built on these are in :mod:`repsqueeze.training.data` (Lightning-free) and
:mod:`repsqueeze.training.datamodules` (Lightning); this module imports neither Lightning nor
torchmetrics, so a deploy tool reading a data set does not pay their import time.

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
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, TensorDataset, default_collate, random_split
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


class TransformedSubset(Dataset):
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


def check_probability(key: str, value: float) -> None:
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
    check_probability("random_erasing", random_erasing)
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


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)`` into ``n - val_size`` train and ``val_size`` val indices."""
    if not 0 <= val_size < n:
        raise ConfigError(f"must be in [0, {n}) for {n} training samples", "val_size", val_size)
    generator = torch.Generator().manual_seed(seed)
    train, val = random_split(range(n), [n - val_size, val_size], generator=generator)
    return list(train.indices), list(val.indices)


def digits_splits(
    val_fraction: float, test_fraction: float, seed: int, normalize: bool, transform: Callable | None = None
) -> tuple[Dataset, Dataset, Dataset, float | None, float | None]:  # fmt: skip
    """scikit-learn's 1797 digits as ``(train, val, test, mean, std)``: pixels in [0, 1], a
    stratified seeded split, and with ``normalize`` standardised with the training split's
    ``mean`` and ``std`` (else those are ``None``). ``transform(mean, std)``, when given,
    builds the training transform, applied to the [0, 1] pixels."""
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.as_tensor(digits.target, dtype=torch.long)
    n = len(y)
    n_test, n_val = round(test_fraction * n), round(val_fraction * n)
    rest, test = train_test_split(
        np.arange(n), test_size=n_test, stratify=digits.target, random_state=seed
    )
    train, val = train_test_split(
        rest, test_size=n_val, stratify=digits.target[rest], random_state=seed
    )
    train, val, test = (torch.as_tensor(i, dtype=torch.long) for i in (train, val, test))
    raw, mean, std = x, None, None
    if normalize:
        mean, std = x[train].mean().item(), x[train].std().item()
        x = (x - mean) / std
    train_set: Dataset = TensorDataset(x[train], y[train])
    if transform is not None:
        pairs = TensorDataset(raw[train], y[train])
        train_set = TransformedSubset(pairs, range(len(train)), transform(mean, std))
    return train_set, TensorDataset(x[val], y[val]), TensorDataset(x[test], y[test]), mean, std


def _cifar_class(name: str) -> type[datasets.CIFAR10]:
    if name not in CIFAR_STATS:
        raise ConfigError(f"unknown CIFAR name; expected one of {list(CIFAR_STATS)}", "name", name)
    return datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100


def _cifar_label(name: str) -> str:
    return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name]


def cifar_set(name: str, data_dir: str, train: bool, transform: Callable | None = None, download: bool = False) -> Dataset:  # fmt: skip
    """The CIFAR-10 or CIFAR-100 (``name``) train or test set found in ``data_dir``.

    Raises:
        DataNotFoundError: the archive's folder is missing or incomplete, naming ``download``
            (the current value ``download``) and what to place where without network access.
    """
    cls = _cifar_class(name)
    folder = Path(data_dir) / cls.base_folder
    try:
        return cls(data_dir, train=train, transform=transform)
    except RuntimeError as err:
        problem = "incomplete or corrupted" if folder.is_dir() else "missing"
        raise DataNotFoundError(
            f"{_cifar_label(name)}: {folder}/ is {problem} (without network access, first place "
            f"{cls.filename} from {cls.url} in {data_dir})",
            "download",
            download,
            fix=True,
        ) from err


def download_cifar(name: str, data_dir: str) -> None:
    """Downloads the CIFAR-10 or CIFAR-100 archive into ``data_dir`` when it is missing.

    Raises:
        ConfigError: the download failed, naming ``download`` and the file to place instead.
    """
    cls = _cifar_class(name)
    for train in (True, False):
        try:
            cls(data_dir, train=train, download=True)
        except Exception as err:  # URLError, timeouts, md5 mismatches, tar errors ...
            raise ConfigError(
                f"downloading {_cifar_label(name)} from {cls.url} failed "
                f"({type(err).__name__}: {err}); without network access, place "
                f"{cls.filename} (or its extracted {cls.base_folder}/) in {data_dir}",
                "download",
                True,
            ) from err


def load_image(path: str) -> Image.Image:
    """An RGB image, as ``ImageFolder``'s default loader reads it; an unreadable file raises
    :class:`ConfigError` naming it."""
    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for broken files
        raise ConfigError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err


def find_classes(path: Path, root: Path) -> list[str]:
    """The class sub-folders of ``path``; none raises :class:`DataNotFoundError` naming ``root``."""
    try:
        return datasets.folder.find_classes(path)[0]
    except FileNotFoundError as err:  # no class sub-folder
        raise DataNotFoundError(
            f"{path} has no class sub-folders (expected {path}/<class>/<image>)", "root", str(root)
        ) from err


def image_folder(
    path: Path,
    root: Path,
    transform: Callable | None = None,
    classes: list[str] | None = None,
    train_dir: Path | None = None,
) -> datasets.ImageFolder:
    """``ImageFolder(path)`` read with :func:`load_image`; a problem names ``root``, as do
    classes that differ from ``classes`` (those of ``train_dir``) when given."""
    find_classes(path, root)
    try:
        folder = datasets.ImageFolder(path, transform=transform, loader=load_image)
    except FileNotFoundError as err:  # a class folder without any image file
        raise DataNotFoundError(str(err), "root", str(root)) from err
    if classes is not None and folder.classes != classes:
        raise ConfigError(
            f"the classes of {path} differ from those of {train_dir}", "root", str(root)
        )
    return folder
