"""Support for the training and command-line tests: the overrides that keep a training run
quiet, and data files made in the test (nothing is downloaded): ImageFolder trees of random
PNGs and CIFAR-10 / CIFAR-100 archives in torchvision's extracted layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

QUIET = ["callbacks.progress_bar.refresh_rate=0", "logger=none"]  # train: no bar, no logger
CIFAR10_PER_BATCH = 8  # five train batches -> 40 train images
CIFAR_TEST = 6


def image_folder(
    root: Path, classes: int = 2, per_class: int = 4, size: int = 8, width: int | None = None,
    corrupt: bool = False,
) -> Path:  # fmt: skip
    """``classes`` class folders of ``per_class`` random ``size x width`` RGB PNGs; with
    ``corrupt``, one more file in the last class that is not an image. Returns ``root``."""
    rng = np.random.default_rng(0)
    names = [f"class{c}" for c in range(classes)]
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, width or size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    if corrupt:
        (root / names[-1] / "broken.png").write_bytes(b"not a png at all")
    return root


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def fake_cifar10(root: Path) -> np.ndarray:
    """torchvision's cifar-10-batches-py layout; returns the train images as (N, 32, 32, 3)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = []
    for i in range(1, 6):
        data = _images(rng, CIFAR10_PER_BATCH)
        labels = rng.integers(0, 10, CIFAR10_PER_BATCH).tolist()
        _dump(
            {"batch_label": f"batch {i}", "data": data, "labels": labels},
            folder / f"data_batch_{i}",
        )
        train.append(data)
    test = {
        "batch_label": "test",
        "data": _images(rng, CIFAR_TEST),
        "labels": list(range(CIFAR_TEST)),
    }
    _dump(test, folder / "test_batch")
    _dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, folder / "batches.meta")
    return np.vstack(train).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def fake_cifar100(root: Path) -> None:
    """torchvision's cifar-100-python layout: 40 train and :data:`CIFAR_TEST` test images."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", 40), ("test", CIFAR_TEST)):
        split = {
            "data": _images(rng, n),
            "fine_labels": rng.integers(0, 100, n).tolist(),
            "coarse_labels": rng.integers(0, 20, n).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
            "batch_label": name,
        }
        _dump(split, folder / name)
    meta = {
        "fine_label_names": [f"f{i}" for i in range(100)],
        "coarse_label_names": [f"c{i}" for i in range(20)],
    }
    _dump(meta, folder / "meta")
