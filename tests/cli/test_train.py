"""End-to-end: ``train(cfg)`` on digits, the deployed-logit check, checkpoints, resume, DDP,
multiruns; and every configuration mistake refused before training, in one line.

``fast_dev_run`` runs and the refusals are fast; real training, resuming, DDP and the
multirun (``python train.py`` in a subprocess) are marked ``slow``.
"""

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import lightning
import pytest
import torch
import torchvision.datasets.cifar
import yaml
from omegaconf import OmegaConf
from training_support import QUIET, image_folder

import repsqueeze.training.callbacks
from repsqueeze.cli import runs
from repsqueeze.cli import train as cli_train
from repsqueeze.cli.errors import one_line
from repsqueeze.cli.preflight import instantiate_group, net_from_data
from repsqueeze.cli.schema import validate
from repsqueeze.cli.settings import TRAIN_SCHEMA
from repsqueeze.cli.train import train
from repsqueeze.export import count_params, load_deployed
from repsqueeze.models import create_model
from repsqueeze.surgery import deploy
from repsqueeze.training.datasets import ConfigError
from repsqueeze.training.lit import Classifier

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = ["plain", "repvgg", "acb", "dbb", "mobileone", "expand_ck", "expand_cl"]


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
    cfg = compose_train("debug=fdr", f"block={block}")
    metrics, objects = train(cfg)
    assert metrics["test/max_logit_diff"] < 1e-5
    assert metrics["test/acc_deployed"] == metrics["test/acc"]
    assert metrics["params_deployed"] < metrics["params"]
    _check_deployed_artifacts(tmp_path, objects)


@pytest.mark.parametrize("test", [True, False])
def test_one_run_deploys_once_and_leaves_its_config_unchanged(
    compose_train, tmp_path, monkeypatch, test
):
    """Every binding of the public ``deploy`` in repsqueeze's modules counts its calls: the
    test's check deploys, and the saved deployed.pt is that network (without a test, the
    run deploys once itself). The composed config is the same after the run."""
    calls = []

    def counted(net, *args, **kwargs):
        calls.append(type(net).__name__)
        return deploy(net, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("repsqueeze") and getattr(module, "deploy", None) is deploy:
            monkeypatch.setattr(module, "deploy", counted)
    cfg = compose_train("debug=fdr", f"test={str(test).lower()}")
    before = OmegaConf.to_yaml(cfg)
    metrics, objects = train(cfg)
    assert calls == [type(objects["model"].net).__name__]
    assert ("test/max_logit_diff" in metrics) == test
    assert OmegaConf.to_yaml(cfg) == before
    _check_deployed_artifacts(tmp_path, objects)


def test_deployed_mismatch_raises(compose_train, monkeypatch):
    def bad_deploy(net, inplace=False):
        deployed = deploy(net, inplace=inplace)
        with torch.no_grad():
            next(deployed.parameters()).add_(0.1)
        return deployed

    monkeypatch.setattr(repsqueeze.training.callbacks, "deploy", bad_deploy)
    with pytest.raises(RuntimeError, match="deployed model differs from the training form"):
        train(compose_train("debug=fdr"))


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


DDP_SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2"]


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    result = _train_script(
        tmp_path,
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        *DDP_SHORT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Lightning's own messages (rank 1's included) go to the run folder's logs
    said = result.stderr + "".join(f.read_text() for f in (tmp_path / "run").rglob("*.log"))
    assert "GLOBAL_RANK: 1" in said
    assert result.stdout.count("max logit diff") == 1  # the summary comes from rank 0 only
    assert (tmp_path / "run" / "deployed.pt").is_file()


@pytest.mark.slow
def test_ddp_sync_batchnorm_is_refused_on_cpu(tmp_path):
    """PyTorch's DistributedDataParallel refuses SyncBatchNorm on CPU modules, before any
    forward, even when every BatchNorm sits in a repsqueeze block (whose own batch_norm would
    all-reduce over gloo). Fails once PyTorch lifts the limit: then test trainer=ddp on CPU."""
    result = _train_script(
        tmp_path,
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        *DDP_SHORT,
    )
    assert result.returncode != 0
    assert "SyncBatchNorm layers only work with GPU modules" in result.stderr


# --- configuration mistakes: refused before training, one line naming the override ---------


def _refusal(compose_train, *overrides: str) -> str:
    """The one-line message ``train.py`` prints for ``overrides``; nothing may be trained."""
    with pytest.raises(ConfigError) as info:
        train(compose_train(*overrides))
    line = one_line(info.value)
    assert "\n" not in line
    return line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_epochs=0", "trainer.max_epochs=0: nothing would be trained"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0: nothing would be trained"),
        ("trainer.limit_train_batches=0.0", "trainer.limit_train_batches=0.0: nothing would be trained"),
        ("+trainer.max_steps=0", "trainer.max_steps=0: nothing would be trained"),
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1: must be > 0"),
        ("data.batch_size=0", "data.batch_size=0: must be a positive integer"),
        ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
        ("model.net.block=resnet", "model.net.block=resnet: must be one of plain, repvgg"),
        ("+model.net.foo=1", "model: TypeError: digits_net got an unexpected keyword argument 'foo'"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1: must be >= 0"),
        ("+optimizer.betas=[0.9,2]", "torch.optim.AdamW (or the scheduler) refuses its arguments"),
        ("ckpt_path=missing.ckpt", "ckpt_path=missing.ckpt: no such checkpoint file"),
    ],
)  # fmt: skip
def test_config_mistake_is_one_line(compose_train, override, expected):
    assert _refusal(compose_train, override).startswith(expected)


def test_fast_dev_run_with_zero_epochs_still_trains(compose_train):
    validate(compose_train("debug=fdr", "trainer.max_epochs=0", "scheduler=none"), TRAIN_SCHEMA)


@pytest.mark.parametrize(
    ("key", "value", "data_value", "what"),
    [("in_channels", 3, 1, "input channels"), ("num_classes", 100, 10, "classes")],
)
def test_model_that_contradicts_the_data_is_refused(compose_train, key, value, data_value, what):
    line = _refusal(compose_train, f"model.net.{key}={value}")
    assert line.startswith(
        f"model.net.{key}={value}: the data (data=DigitsDataModule) has {data_value} "
    )
    assert line.endswith(f"leave it null to take the data's, or choose data with {value} {what}")


def test_classes_and_channels_come_from_the_data(compose_train, tmp_path):
    folder = image_folder(tmp_path / "images")
    cfg = compose_train("data=imagefolder", f"data.root={folder}", "data.image_size=8")
    datamodule = instantiate_group(cfg.data, "data")
    assert net_from_data(cfg, datamodule) == {"num_classes": 2, "in_channels": 3}
    assert (cfg.model.net.num_classes, cfg.model.net.in_channels) == (None, None)  # unchanged
    explicit = compose_train("model.net.num_classes=10", "model.net.in_channels=1")
    assert net_from_data(explicit, instantiate_group(explicit.data, "data")) == {}


def test_image_folder_root_that_does_not_exist(compose_train, tmp_path):
    line = _refusal(compose_train, "data=imagefolder", f"data.root={tmp_path / 'nowhere'}")
    assert line == f"data.root={tmp_path / 'nowhere'}: no such directory"


def test_cifar_without_files_names_the_download_override(compose_train, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    line = _refusal(compose_train, "data=cifar10", f"data.data_dir={tmp_path / 'empty'}")
    assert line.startswith("data.download=false: CIFAR-10: ")
    assert f"{tmp_path / 'empty' / 'cifar-10-batches-py'}/ is missing" in line
    assert "place cifar-10-python.tar.gz from https://" in line
    assert line.endswith("; set data.download=true")
    assert "download=True" not in line


def test_cifar_offline_says_how_to_place_the_files(compose_train, tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    line = _refusal(
        compose_train, "data=cifar100", "data.download=true", f"data.data_dir={tmp_path}"
    )
    assert line.startswith("data.download=true: downloading CIFAR-100 from https://")
    assert "failed (URLError: " in line
    assert (
        f"place cifar-100-python.tar.gz (or its extracted cifar-100-python/) in {tmp_path}" in line
    )


def test_corrupt_image_is_named(compose_train, tmp_path):
    """The broken file is read in a DataLoader worker: the one line still names it."""
    folder = image_folder(tmp_path / "images", corrupt=True)
    cfg = compose_train(
        "data=imagefolder", f"data.root={folder}", "data.image_size=8", "data.batch_size=9",
        "data.num_workers=1", "data.pin_memory=false", "data.val_fraction=0.5",
        "trainer.max_epochs=1", "test=false", "deploy=false",
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        train(cfg)
    line = one_line(info.value)
    assert line.startswith(f"{folder / 'class1' / 'broken.png'}: not a readable image")
    assert "\n" not in line


def test_remove_if_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    run = logs / "train" / "runs" / f"2026-01-01_00-00-00_{runs.run_id()}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("a: 1\n")
    (run / "train.log").write_text("")
    (run / "csv" / "version_0").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    assert not runs.remove_if_empty(run, logs)  # a checkpoint keeps the folder
    assert (run / "checkpoints" / "last.ckpt").is_file()
    (run / "checkpoints" / "last.ckpt").unlink()
    (logs / "train" / "multiruns").mkdir()
    assert runs.remove_if_empty(run, logs)
    assert not (logs / "train" / "runs").exists()  # left empty: removed
    assert (logs / "train" / "multiruns").is_dir()  # not ours
    assert not runs.remove_if_empty(tmp_path)  # the working directory: never


@pytest.mark.parametrize("where", ["named by the user", "named by another run", "sweep job"])
def test_remove_if_empty_keeps_a_folder_this_run_did_not_name(tmp_path, monkeypatch, where):
    """``hydra.run.dir=<a folder of mine>``: a failed run leaves the folder and its files."""
    monkeypatch.chdir(tmp_path)
    run = {
        "named by the user": tmp_path / "mine",
        "named by another run": tmp_path / "2026-01-01_00-00-00_1-abcdef",
        "sweep job": tmp_path / "my-sweep" / "0",
    }[where]
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("mine: 1\n")
    (run / "notes.log").write_text("my log")
    assert not runs.remove_if_empty(run, tmp_path)
    assert (run / "notes.log").read_text() == "my log"
    assert (run / ".hydra" / "config.yaml").read_text() == "mine: 1\n"
    sweep = tmp_path / f"sweep_{runs.run_id()}" / "3"
    sweep.mkdir(parents=True)
    assert runs.remove_if_empty(sweep, tmp_path)  # a job folder of this run's sweep


def test_run_folders_are_unique_per_run(tmp_path):
    """Two processes started in the same second name two folders."""
    code = (
        "from omegaconf import OmegaConf; import repsqueeze.cli.runs; "
        "print(OmegaConf.create({'d': 'x_${run_id:}'}).d)"
    )
    names = [
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert len(set(names)) == 2 and all(n.startswith("x_") for n in names)
    assert runs.run_id() == runs.run_id()


def test_one_line_of_a_worker_error():
    err = ConfigError(
        "Caught ConfigError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1\nrepsqueeze.training.datasets.ConfigError: a/b.png: not a '
        "readable image (UnidentifiedImageError: cannot identify image file)\n"
    )
    assert one_line(err) == (
        "a/b.png: not a readable image (UnidentifiedImageError: cannot identify image file)"
    )


def _train_script(tmp_path: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    """``python train.py`` in ``tmp_path`` (logs under ``tmp_path/logs``)."""
    flags = [o for o in overrides if o.startswith("-")]  # before the overrides, for argparse
    command = [sys.executable, str(ROOT / "train.py"), *flags, f"paths.root_dir={tmp_path}", *QUIET]
    return subprocess.run(
        [*command, *(o for o in overrides if not o.startswith("-"))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def test_script_refusal_is_one_line_and_leaves_no_run_folder(tmp_path):
    result = _train_script(tmp_path, "trainer.max_epochs=0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "train.py: error: trainer.max_epochs=0: nothing would be trained"
    )
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == []


@pytest.mark.slow
def test_script_full_error_shows_the_traceback(tmp_path):
    result = _train_script(tmp_path, "data.batch_size=0", HYDRA_FULL_ERROR="1")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "SettingError: data.batch_size=0: must be a positive integer" in result.stderr


# --- Hydra and Lightning conventions ----------------------------------------------------------


def test_main_returns_the_optimized_metric_and_logs_the_config(compose_train, tmp_path):
    cfg = compose_train(
        "logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "test=false", "deploy=false",
    )  # fmt: skip
    value = cli_train.hydra_main.__wrapped__(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert value == metrics["val/acc_best"]
    hparams = yaml.safe_load(next(tmp_path.glob("csv/*/hparams.yaml")).read_text())
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("trainer", "optimizer", "scheduler", "data", "seed", "paths"):
        assert hparams[key] == resolved[key], key
    assert hparams["model"]["net"]["num_classes"] == 10  # filled in from the data
    from_data = {"num_classes": 10, "in_channels": 1}  # given when the model was built
    assert hparams["net_config"] == {**resolved["model"]["net"], **from_data}  # Lightning's own


def test_compare_jobs_table(tmp_path, capsys):
    for job, (block, acc) in enumerate([("plain", 0.9), ("dbb", 0.95)]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        overrides = [f"block={block}", "trainer.max_epochs=3"]
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        (folder / "metrics.json").write_text(
            json.dumps({"val/acc_best": acc, "params": 1000 + job})
        )
    (tmp_path / "2").mkdir()  # a job that did not finish
    rows = cli_train.compare_jobs(tmp_path)
    assert rows == [
        {"job": "0", "block": "plain", "val/acc_best": 0.9, "params": 1000},
        {"job": "1", "block": "dbb", "val/acc_best": 0.95, "params": 1001},
    ]
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    cli_train.CompareJobs().on_multirun_end(sweep)
    out = capsys.readouterr().out
    assert "2 jobs in" in out and "block" in out and "0.950" in out
    assert "|" not in out  # the plain terminal table
    assert (tmp_path / "comparison.md").read_text().startswith("| job")


@pytest.mark.slow
def test_multirun_over_block_kinds_prints_a_comparison(tmp_path):
    result = _train_script(tmp_path, "-m", "block=plain,repvgg", "debug=fdr")
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("2 jobs in") :]
    assert "plain" in table and "repvgg" in table and "test/acc_deployed" in table
    (sweep,) = (tmp_path / "logs" / "debug" / "multiruns").iterdir()
    assert (sweep / "comparison.md").is_file()
    assert sorted(p.name for p in sweep.glob("*/metrics.json")) == ["metrics.json"] * 2
