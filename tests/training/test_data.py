"""Tests for repsqueeze.training.datasets and datamodules: splits, shapes, determinism, and no augmentation in val.

CIFAR and ImageFolder data are fabricated on disk in ``tmp_path``; nothing is downloaded.
"""

import pickle
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision import transforms as T
from training_support import CIFAR_TEST, fake_cifar10, fake_cifar100

from repsqueeze.training.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    example_batch,
)
from repsqueeze.training.datasets import CIFAR_STATS, ConfigError, DataNotFoundError, load_image

N_DIGITS = 1797


def _labels(dataset) -> torch.Tensor:
    return dataset.tensors[1]


# --- digits ----------------------------------------------------------------------------------


def test_digits_split_sizes_and_stratification():
    dm = DigitsDataModule()
    dm.setup()
    splits = [dm.train_set, dm.val_set, dm.test_set]
    assert sum(len(s) for s in splits) == N_DIGITS
    assert len(dm.test_set) == round(0.2 * N_DIGITS)
    assert len(dm.val_set) == round(0.15 * N_DIGITS)
    overall = torch.bincount(torch.cat([_labels(s) for s in splits]), minlength=10)
    for split in splits:
        counts = torch.bincount(_labels(split), minlength=10)
        assert (counts > 0).all()
        # stratified: each class's share of the split matches its share of the whole data
        expected = overall * len(split) / N_DIGITS
        assert (counts - expected).abs().max() <= 1


@settings(max_examples=10, deadline=None)
@given(
    val_fraction=st.floats(0.05, 0.3),
    test_fraction=st.floats(0.05, 0.3),
    seed=st.integers(0, 2**31 - 1),
)
def test_digits_any_split_covers_every_class(val_fraction, test_fraction, seed):
    dm = DigitsDataModule(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    dm.setup()
    splits = [dm.train_set, dm.val_set, dm.test_set]
    assert sum(len(s) for s in splits) == N_DIGITS
    for split in splits:
        assert set(_labels(split).tolist()) == set(range(10))


def test_digits_deterministic_per_seed():
    a, b, c = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for dm in (a, b, c):
        dm.setup()
    for name in ("train_set", "val_set", "test_set"):
        for ta, tb in zip(getattr(a, name).tensors, getattr(b, name).tensors, strict=True):
            assert torch.equal(ta, tb)
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])
    xa, ya = next(iter(a.train_dataloader()))
    xb, yb = next(iter(b.train_dataloader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_digits_normalised_with_train_statistics():
    raw, dm = DigitsDataModule(normalize=False), DigitsDataModule()
    raw.setup()
    dm.setup()
    x_raw = raw.train_set.tensors[0]
    assert x_raw.dtype == torch.float32
    assert x_raw.min() >= 0 and x_raw.max() <= 1
    x = dm.train_set.tensors[0]
    assert abs(x.mean().item()) < 1e-4
    assert abs(x.std().item() - 1) < 1e-4
    assert dm.mean == pytest.approx(x_raw.mean().item())
    assert dm.std == pytest.approx(x_raw.std().item())
    expected = (raw.test_set.tensors[0] - dm.mean) / dm.std
    torch.testing.assert_close(dm.test_set.tensors[0], expected)


def test_digits_batches_and_setup_idempotent():
    dm = DigitsDataModule(batch_size=16)
    dm.setup("fit")
    train_set = dm.train_set
    dm.setup("test")
    assert dm.train_set is train_set
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 8)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert y.min() >= 0 and y.max() < 10
    assert not dm.train_dataloader().pin_memory


def test_digits_loader_options():
    dm = DigitsDataModule()
    dm.setup()
    assert not dm.train_dataloader().persistent_workers
    dm = DigitsDataModule(num_workers=2)
    dm.setup()
    assert dm.train_dataloader().persistent_workers
    assert isinstance(dm.val_dataloader().sampler, torch.utils.data.SequentialSampler)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction=0.5: val_fraction + test_fraction must be < 1"),
        ({"test_fraction": 0.0}, "test_fraction=0.0: must be in (0, 1)"),
        ({"val_fraction": 1.5}, "val_fraction=1.5: must be in (0, 1)"),
        ({"batch_size": 0}, "batch_size=0: must be a positive integer"),
        ({"batch_size": 2.5}, "batch_size=2.5: must be a positive integer"),
        ({"batch_size": True}, "batch_size=True: must be a positive integer"),
        ({"num_workers": -1}, "num_workers=-1: must be an integer >= 0"),
    ],
)  # fmt: skip
def test_digits_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError) as info:
        DigitsDataModule(**kwargs)
    assert str(info.value).startswith(message)
    assert info.value.key in kwargs


def test_config_error_renders_as_an_override_and_pickles():
    err = ConfigError("missing", "download", False, fix=True)
    assert str(err) == "download=False: missing; set download=True"
    assert err.render("data.", str) == "data.download=False: missing; set data.download=True"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), again.key, again.value, again.fix) == (
        ConfigError,
        "download",
        False,
        True,
    )
    assert str(ConfigError("a/b.png: broken")) == "a/b.png: broken"
    assert str(ConfigError("no such directory", "root")) == "root: no such directory"


def test_loader_before_setup_raises():
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


def test_example_batch():
    dm = DigitsDataModule(batch_size=8)
    for stage in ("train", "val", "test"):
        x, y = example_batch(dm, stage)
        assert x.shape == (8, 1, 8, 8) and y.shape == (8,)
    _, y = example_batch(DigitsDataModule(batch_size=8))  # default stage: test
    assert torch.equal(y, next(iter(dm.test_dataloader()))[1])
    with pytest.raises(ValueError, match="stage"):
        example_batch(dm, "predict")


# --- CIFAR -----------------------------------------------------------------------------------


def test_cifar10_shapes_split_and_val_without_augmentation(tmp_path, skip_md5):
    train_images = fake_cifar10(tmp_path)
    dm = CIFARDataModule(tmp_path, batch_size=4, num_workers=0, val_size=10, seed=3)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (30, 10)
    assert sorted(dm.train_set.indices + dm.val_set.indices) == list(range(40))
    dm.setup("test")
    assert len(dm.test_set) == CIFAR_TEST
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64

    # val: deterministic, and exactly ToTensor + Normalize of the raw image at its index
    first, second = dm.val_set[0][0], dm.val_set[0][0]
    assert torch.equal(first, second)
    raw = Image.fromarray(train_images[dm.val_set.indices[0]])
    plain = T.Normalize(*CIFAR_STATS["cifar10"])(T.ToTensor()(raw))
    torch.testing.assert_close(first, plain)
    # train: augmented (random crop + flip), so repeated reads differ
    draws = [dm.train_set[0][0] for _ in range(10)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])

    same = CIFARDataModule(tmp_path, val_size=10, seed=3)
    same.setup("fit")
    assert same.val_set.indices == dm.val_set.indices
    other = CIFARDataModule(tmp_path, val_size=10, seed=4)
    other.setup("fit")
    assert other.val_set.indices != dm.val_set.indices


def test_cifar_without_augmentation(tmp_path, skip_md5):
    fake_cifar10(tmp_path)
    dm = CIFAR10DataModule(data_dir=tmp_path, val_size=10, augment=False)
    dm.setup("fit")
    assert torch.equal(dm.train_set[0][0], dm.train_set[0][0])


def test_cifar100(tmp_path, skip_md5):
    fake_cifar100(tmp_path)
    dm = CIFAR100DataModule(data_dir=tmp_path, batch_size=5, num_workers=0, val_size=8)
    assert dm.num_classes == 100
    x, y = example_batch(dm, "test")
    assert x.shape == (5, 3, 32, 32)
    assert y.dtype == torch.int64 and y.max() < 100
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (32, 8)
    assert next(iter(dm.val_dataloader()))[0].shape == (5, 3, 32, 32)


def test_cifar_missing_files_raise_without_download(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    dm = CIFARDataModule(tmp_path / "empty", num_workers=0)
    dm.prepare_data()  # download=False: must not fetch anything
    with pytest.raises(DataNotFoundError, match="set download=True$") as info:
        dm.setup("fit")
    assert isinstance(info.value, FileNotFoundError)
    assert (info.value.key, info.value.value, info.value.fix) == ("download", False, True)
    assert f"{tmp_path / 'empty' / 'cifar-10-batches-py'}/ is missing" in str(info.value)
    with pytest.raises(FileNotFoundError, match="CIFAR-10"):
        dm.setup("test")
    (tmp_path / "empty" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="is incomplete or corrupted"):
        dm.setup("fit")


def test_cifar_download_failure_says_how_to_place_the_files(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    dm = CIFARDataModule(tmp_path, download=True, num_workers=0)
    with pytest.raises(ConfigError) as info:
        dm.prepare_data()
    assert str(info.value) == (
        f"download=True: downloading CIFAR-10 from {torchvision.datasets.CIFAR10.url} failed "
        "(URLError: <urlopen error no network>); without network access, place "
        f"cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) in {tmp_path}"
    )


def test_cifar_prepare_data_downloads_when_asked(tmp_path, monkeypatch, skip_md5):
    urls = []

    def fake_download(url, download_root, **kwargs):
        urls.append(url)
        fake_cifar100(Path(download_root))

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    dm = CIFARDataModule(tmp_path, name="cifar100", download=True, val_size=8, num_workers=0)
    dm.prepare_data()
    dm.prepare_data()  # already there: nothing fetched again
    assert urls == [torchvision.datasets.CIFAR100.url]
    dm.setup()
    assert len(dm.train_set) == 32


def test_cifar_unknown_name():
    with pytest.raises(ConfigError, match="name='svhn': unknown CIFAR name"):
        CIFARDataModule(name="svhn")


def test_cifar_val_size_out_of_range(tmp_path, skip_md5):
    fake_cifar10(tmp_path)
    with pytest.raises(ConfigError, match=r"val_size=40: must be in \[0, 40\)"):
        CIFARDataModule(tmp_path, val_size=40).setup("fit")


# --- ImageFolder -----------------------------------------------------------------------------

CLASSES = ("ant", "bee", "cat")


def _write_images(folder: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_image_folder_single_root_split(tmp_path):
    _write_images(tmp_path, per_class=4, seed=0)
    dm = ImageFolderDataModule(
        tmp_path, batch_size=3, num_workers=0, image_size=32, val_fraction=0.25
    )
    assert (dm.num_classes, dm.in_channels) == (3, 3)  # known before setup
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set)) == (9, 3)
    assert sorted(dm.train_set.indices + dm.val_set.indices) == list(range(12))
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (3, 3, 32, 32) and y.dtype == torch.int64
        assert y.max() < 3
    again = ImageFolderDataModule(tmp_path, image_size=32, val_fraction=0.25)
    again.setup()
    assert again.val_set.indices == dm.val_set.indices


def test_image_folder_train_val_layout(tmp_path):
    _write_images(tmp_path / "train", per_class=3, seed=0)
    _write_images(tmp_path / "val", per_class=2, seed=1)
    dm = ImageFolderDataModule(tmp_path, batch_size=2, num_workers=0, image_size=32)
    assert dm.num_classes == 3
    x, y = example_batch(dm, "val")
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 6, 6)
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])
    assert next(iter(dm.train_dataloader()))[0].shape == (2, 3, 32, 32)


def test_image_folder_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    dm = ImageFolderDataModule(missing)
    assert dm.num_classes is None
    with pytest.raises(
        DataNotFoundError, match=re.escape(f"root={str(missing)!r}: no such directory")
    ):
        dm.setup()


def test_image_folder_without_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "0.png")
    with pytest.raises(DataNotFoundError, match="has no class sub-folders"):
        ImageFolderDataModule(tmp_path / "flat")
    (tmp_path / "empty" / "ant").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="root=.*Found no valid file"):
        ImageFolderDataModule(tmp_path / "empty").setup()


def test_corrupt_image_names_its_file(tmp_path):
    _write_images(tmp_path, per_class=2, seed=0)
    (tmp_path / "bee" / "broken.png").write_bytes(b"not a png")
    truncated = tmp_path / "cat" / "truncated.png"
    truncated.write_bytes((tmp_path / "cat" / "0.png").read_bytes()[:100])
    assert load_image(str(tmp_path / "ant" / "0.png")).mode == "RGB"
    dm = ImageFolderDataModule(tmp_path, image_size=32, val_fraction=0.0)
    dm.setup()
    broken = [i for i, (path, _) in enumerate(dm.train_set.dataset.samples) if "broken" in path]
    with pytest.raises(
        ConfigError,
        match=re.escape(
            f"{tmp_path / 'bee' / 'broken.png'}: not a readable image (UnidentifiedImageError"
        ),
    ):
        dm.train_set.dataset[broken[0]]
    with pytest.raises(ConfigError, match=re.escape(f"{truncated}: not a readable image (OSError")):
        load_image(str(truncated))


def test_image_folder_val_classes_must_match_train(tmp_path):
    _write_images(tmp_path / "train", per_class=1, seed=0)
    (tmp_path / "val" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "dog" / "0.png")
    with pytest.raises(ValueError, match="classes"):
        ImageFolderDataModule(tmp_path, image_size=32).setup()
