"""End-to-end: ``train(cfg)`` on digits, the deployed-logit check, checkpoints, resume, DDP.

``fast_dev_run`` runs are fast; real training, resuming and DDP (two CPU processes launched
by ``python train.py`` in a subprocess) are marked ``slow``.
"""

import importlib.util
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import repsqueeze.lit
from repsqueeze.convert import deploy
from repsqueeze.export import count_params, load_deployed
from repsqueeze.lit import Classifier
from repsqueeze.models import create_model

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = ["plain", "repvgg", "acb", "dbb", "mobileone", "expand_ck", "expand_cl"]
QUIET = ["callbacks.progress_bar.refresh_rate=0", "logger=none"]

_spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)
train = train_script.train

Compose = Callable[..., DictConfig]


@pytest.fixture
def compose_train(tmp_path: Path) -> Iterator[Compose]:
    """``compose_train(*overrides)``: the train config, writing only under ``tmp_path``."""
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
    paths = [f"paths.{key}={tmp_path}" for key in ("root_dir", "log_dir", "output_dir")]
    yield lambda *overrides: compose("train", overrides=[*paths, *QUIET, *overrides])
    GlobalHydra.instance().clear()


def _check_deployed_artifacts(output_dir: Path, objects: dict) -> None:
    """``deployed.pt`` loads strictly into a model built deployed, and matches."""
    payload = torch.load(output_dir / "deployed.pt", weights_only=True)
    assert payload["arch"] == objects["model"].hparams.net_config
    rebuilt = create_model(**payload["arch"], deployed=True).eval()
    rebuilt.load_state_dict(payload["state_dict"], strict=True)
    assert count_params(load_deployed(output_dir / "deployed.pt")) == count_params(rebuilt)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = objects["model"].net.cpu().eval()(x)
        torch.testing.assert_close(rebuilt(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(objects["deployed"](x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", BLOCKS)
def test_fast_dev_run(compose_train, tmp_path, block):
    cfg = compose_train("debug=fdr", f"model.net.block={block}")
    metrics, objects = train(cfg)
    assert metrics["test/max_logit_diff"] < 1e-5
    assert metrics["test/acc_deployed"] == metrics["test/acc"]
    assert metrics["params_deployed"] < metrics["params"]
    _check_deployed_artifacts(tmp_path, objects)


def test_deployed_mismatch_raises(compose_train, monkeypatch):
    def bad_deploy(net, inplace=False):
        deployed = deploy(net, inplace=inplace)
        with torch.no_grad():
            next(deployed.parameters()).add_(0.1)
        return deployed

    monkeypatch.setattr(repsqueeze.lit, "deploy", bad_deploy)
    with pytest.raises(RuntimeError, match="deployed model differs from the training form"):
        train(compose_train("debug=fdr"))


def test_num_classes_mismatch_is_refused(compose_train):
    with pytest.raises(ValueError, match="set model.net.num_classes=100"):
        train(compose_train("data=cifar100"))


def test_classifier_rebuilds_from_checkpoint(tmp_path):
    net_config = {"name": "digits_net", "block": "dbb", "num_classes": 10, "in_channels": 1}
    model = Classifier({"_target_": "ignored", **net_config})
    assert model.hparams.net_config == net_config
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(checkpoint, tmp_path / "model.ckpt")
    loaded = Classifier.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="num_classes=5 but net_config has 10"):
        Classifier(net_config, num_classes=5)
    with pytest.raises(RuntimeError, match="without an optimizer"):
        model.configure_optimizers()


@pytest.mark.slow
def test_train_digits(compose_train, tmp_path):
    """The default run: digits, CPU, a few epochs; both forms agree on every test sample."""
    metrics, objects = train(compose_train())
    assert metrics["test/acc"] >= 0.9
    assert metrics["test/acc_deployed"] == metrics["test/acc"]
    assert metrics["test/max_logit_diff"] < 1e-5
    assert metrics["val/acc_best"] >= metrics["val/acc"] - 1e-6
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    _check_deployed_artifacts(tmp_path, objects)


@pytest.mark.slow
def test_resume(compose_train, tmp_path):
    short = ["trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "test=false"]
    first, second = tmp_path / "first", tmp_path / "second"
    _, objects = train(compose_train(*short, "trainer.max_epochs=2", f"paths.output_dir={first}"))
    assert objects["trainer"].global_step == 8
    last = first / "checkpoints" / "last.ckpt"
    cfg = compose_train(*short, "trainer.max_epochs=3", f"ckpt_path={last}", f"paths.output_dir={second}")  # fmt: skip
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 12
    assert objects["trainer"].current_epoch == 3


def _run_train_script(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "train.py"), f"paths.root_dir={tmp_path}", *QUIET]
    return subprocess.run(
        [*command, f"hydra.run.dir={tmp_path / 'run'}", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


DDP_SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2"]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    result = _run_train_script(tmp_path, "trainer=ddp_cpu", "trainer.devices=2", *DDP_SHORT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in result.stderr
    assert result.stdout.count("max logit diff") == 1  # the summary comes from rank 0 only
    assert (tmp_path / "run" / "deployed.pt").is_file()


@pytest.mark.slow
def test_ddp_sync_batchnorm_is_refused_on_cpu(tmp_path):
    """PyTorch's DistributedDataParallel refuses SyncBatchNorm on CPU modules, before any
    forward, even when every BatchNorm sits in a repsqueeze block (whose own batch_norm would
    all-reduce over gloo). Fails once PyTorch lifts the limit: then test trainer=ddp on CPU."""
    result = _run_train_script(
        tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *DDP_SHORT
    )
    assert result.returncode != 0
    assert "SyncBatchNorm layers only work with GPU modules" in result.stderr
