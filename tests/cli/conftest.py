"""Fixtures of the deploy tests: the composed deploy config and checkpoints in run folders."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from deploy_support import NET_CONFIG, REPVGG, write_checkpoint
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[2]

Compose = Callable[..., DictConfig]


@pytest.fixture
def compose_deploy(tmp_path: Path) -> Iterator[Compose]:
    """``compose_deploy(*overrides)``: the deploy config, writing only under ``tmp_path``."""
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
    paths = [f"paths.{key}={tmp_path}" for key in ("root_dir", "log_dir", "output_dir")]
    yield lambda *overrides: compose("deploy", overrides=[*paths, *overrides])
    GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def dbb_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dbb digits net (the richest block kind) in a run folder."""
    run_dir = tmp_path_factory.mktemp("run")
    return write_checkpoint(run_dir / "checkpoints" / "model.ckpt", NET_CONFIG)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repvgg digits net in a run folder: cheaper, for the tests of everything else."""
    run_dir = tmp_path_factory.mktemp("run")
    return write_checkpoint(run_dir / "checkpoints" / "model.ckpt", REPVGG)


@pytest.fixture(scope="module")
def checkpoint_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another network (plain ConvBN blocks, other statistics): export B of the
    replacement tests."""
    path = tmp_path_factory.mktemp("run_b") / "b.ckpt"
    return write_checkpoint(path, {**NET_CONFIG, "block": "plain"}, seed=1)
