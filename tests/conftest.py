"""Test configuration: hypothesis profiles, GPU auto-skip, shared fixtures (among them the
real Hydra configs composed with every output under ``tmp_path``).

Profiles: ``ci`` (default; derandomized so every run sees the same examples), ``random``
(as many examples as ``ci``, fresh ones every run: ``HYPOTHESIS_PROFILE=random pytest``) and
``dev`` (500 random examples). Select one with the ``HYPOTHESIS_PROFILE`` environment
variable or ``pytest --hypothesis-profile NAME``; a failing random example is printed with
its ``@reproduce_failure`` blob.
"""

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torchvision.datasets.cifar
from helpers import randomize_bn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, settings
from omegaconf import DictConfig
from training_support import QUIET

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("random", settings.get_profile("ci"), derandomize=False)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=500,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or "ci")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def single_thread():
    """Runs a test with one intra-op thread: tiny tensors on a busy 2-core CI machine are
    several times faster without the thread pool's synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(name="randomize_bn")
def randomize_bn_fixture():
    """The :func:`helpers.randomize_bn` function, for tests that prefer a fixture."""
    return randomize_bn


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """``compose_cfg(name, *overrides, quiet=True, hydra=False)``: the real ``configs/<name>``
    (``train`` or ``deploy``) with ``paths.*`` under ``tmp_path``; ``train`` without progress
    bar and logger unless ``quiet=False``; ``hydra=True`` keeps the ``hydra`` node."""
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3")
    paths = [f"paths.{key}={tmp_path}" for key in ("root_dir", "log_dir", "output_dir")]

    def _compose(name: str, *overrides: str, quiet: bool = True, hydra: bool = False) -> DictConfig:
        extra = QUIET if quiet and name == "train" else []
        return compose(name, overrides=[*paths, *extra, *overrides], return_hydra_config=hydra)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_train(compose_cfg: Callable[..., DictConfig]) -> Callable[..., DictConfig]:
    """``compose_train(*overrides, quiet=True, hydra=False)``: :func:`compose_cfg` of ``train``."""
    return functools.partial(compose_cfg, "train")


@pytest.fixture
def skip_md5(monkeypatch):
    """Accept any file that exists: the fabricated CIFAR files (``training_support``) cannot match
    torchvision's md5s. Both ``_check_integrity`` and ``_load_meta`` go through this
    module-level function."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )
