"""The settings schema of both command lines and their run hygiene.

Every bad setting is refused by :func:`repsqueeze.cli.schema.validate` (or the checks right
after it) before anything is trained or written, as one line naming the setting; these tests
compose the real configs and call ``train(cfg)`` / ``deploy.run(cfg)`` in-process. Runs that
end early (SIGTERM, a failure after the trainer is built, a failing job of a sweep) are checked
on tiny digits runs; the ``slow`` ones run ``python train.py`` as a user would.
"""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch
import pytest
import torch
import yaml
from hydra.errors import MissingConfigException
from lightning.pytorch import Callback
from omegaconf import OmegaConf
from training_support import QUIET, image_folder

import repsqueeze.cli.settings
from repsqueeze import export
from repsqueeze.cli import deploy as deploy_script
from repsqueeze.cli import runs
from repsqueeze.cli import train as cli_train
from repsqueeze.cli.errors import RunInterrupted, SettingError, one_line
from repsqueeze.cli.schema import Int, Rule, Schema, validate
from repsqueeze.cli.settings import DEPLOY_SCHEMA, TRAIN_SCHEMA
from repsqueeze.cli.train import train
from repsqueeze.models import create_model
from repsqueeze.surgery import deploy
from repsqueeze.training.datasets import ConfigError
from repsqueeze.training.lit import Classifier

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
SHORT += ["test=false", "deploy=false"]
NET = {"name": "digits_net", "block": "repvgg", "num_classes": 10, "in_channels": 1}


def _checkpoint(path: Path, net_config: dict = NET) -> Path:
    model = Classifier(net_config)
    state = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save(state, path)
    return path


def _bad_checkpoint(kind: str, tmp_path: Path) -> Path:
    if kind == "deployed":
        net = deploy(create_model(**NET)).eval()
        export.save_deployed(net, tmp_path / "deployed.pt", NET)
        return tmp_path / "deployed.pt"
    if kind == "truncated":
        path = _checkpoint(tmp_path / "t.ckpt")
        path.write_bytes(path.read_bytes()[:1000])
        return path
    if kind == "pickle":
        from argparse import Namespace  # a class weights_only=True refuses to build

        torch.save({"state_dict": Namespace(a=1)}, tmp_path / "p.ckpt")
        return tmp_path / "p.ckpt"
    return _checkpoint(tmp_path / "dbb.ckpt", {**NET, "block": "dbb"})


def _has_xla() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_xla") is not None


TRAIN_REFUSALS = [
    ("trainer.max_epochs=abc", "trainer.max_epochs=abc: must be an integer"),
    ("seed=abc", "seed=abc: must be an integer"),
    ("model.label_smoothing=2", "model.label_smoothing=2: must be < 1"),
    ("model.deploy_tolerance=-1", "model.deploy_tolerance=-1: must be >= 0"),
    ("trainer.precision=7", "trainer.precision=7: must be one of 64, 32, 16,"),
    (
        "trainer.devices=[a]",
        "trainer.devices=[a]: must be auto, a count >= 1 (-1: all), or a list of device indices",
    ),  # fmt: skip
    ("trainer.devices=abc", "trainer.devices=abc: must be auto, a count >= 1"),
    ("trainer.devices=0", "trainer.devices=0: must be auto, a count >= 1"),
    ("trainer.accelerator=tpux", "trainer.accelerator=tpux: must be one of auto, gpu"),
    pytest.param(
        "trainer.accelerator=tpu",
        "trainer.accelerator=tpu: this machine has no tpu: use trainer.accelerator=cpu or auto",
        marks=pytest.mark.skipif(_has_xla(), reason="has a TPU"),
    ),  # fmt: skip
    ("optimizer.lr=0", "optimizer.lr=0: must be > 0 (a learning rate of 0 trains nothing)"),
    ("data.batch_size=abc", "data.batch_size=abc: must be an integer"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5: must be < 1"),
    ("data.num_workers=abc", "data.num_workers=abc: must be an integer"),
    (
        "trainer.check_val_every_n_epoch=0",
        "trainer.check_val_every_n_epoch=0: must be a positive integer",
    ),  # fmt: skip
    ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps=-1: must be a positive integer"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches=-1: must be >= 0"),
    (
        "trainer.limit_val_batches=1.5",
        "trainer.limit_val_batches=1.5: a fraction of the batches must be in [0, 1]",
    ),  # fmt: skip
    ("optimizer.weight_decay=abc", "optimizer.weight_decay=abc: must be a number"),
    ("+optimizer.betas=[0.9]", "optimizer.betas=[0.9]: must be"),
    ("scheduler=step scheduler.step_size=0", "scheduler.step_size=0: must be a positive integer"),
    ("+trainer.foo=1", "trainer.foo=1: lightning.pytorch.Trainer takes no argument 'foo'"),
    (
        "+trainer.max_epoch=1",
        "trainer.max_epoch=1: lightning.pytorch.Trainer takes no argument 'max_epoch'; did you mean trainer.max_epochs?",
    ),  # fmt: skip
    (
        "+data.foo=1",
        "data.foo=1: repsqueeze.training.datamodules.DigitsDataModule takes no argument 'foo'",
    ),
    ("+seeed=1", "seeed=1: not a setting of this command; did you mean seed?"),
    ("model.compile=abc", "model.compile=abc: must be true or false or dict"),
    ("model.mode=fast", "model.mode=fast: must be one of chain, online, auto"),
    (
        "+model.net.mode=online",
        "model.net.mode=online: the blocks' run mode is set by model.mode: use model.mode=online",
    ),  # fmt: skip
    ("test=maybe", "test=maybe: must be true or false"),
    ("model.net.name=nope", "model.net.name=nope: must be one of"),
    (
        "callbacks.model_checkpoint.monitor=val/nope",
        "callbacks.model_checkpoint.monitor=val/nope: must be one of",
    ),  # fmt: skip
    (
        "callbacks.model_checkpoint.mode=maximum",
        "callbacks.model_checkpoint.mode=maximum: must be one of min, max",
    ),  # fmt: skip
    ("optimized_metric=val/nope", "optimized_metric=val/nope: must be one of"),
    (
        "trainer.min_epochs=9 trainer.max_epochs=2",
        "trainer.min_epochs=9: must be <= trainer.max_epochs=2",
    ),  # fmt: skip
    ("ckpt_path=last", "ckpt_path=last: no run under"),
    (
        "data=imagefolder data.val_fraction=0",
        "data.val_fraction=0: must be > 0 (validation picks the best checkpoint)",
    ),  # fmt: skip
    ("data=cifar10 data.val_size=0", "data.val_size=0: must be a positive integer"),
    (
        "model.mode=online block=dbb",
        "model.mode=online: the network cannot train on this data: branches.0.1 (BatchNorm2d) normalises with batch statistics",
    ),  # fmt: skip
    (
        "model.mode=online block=qarepvgg",
        "model.mode=online: the network cannot train on this data:",
    ),  # fmt: skip
]


def test_an_option_an_experiment_asks_for_is_refused_naming_the_experiment():
    err = MissingConfigException(
        "In 'experiment/mine': Could not find 'block/dbbb'", "block/dbbb", ["dbb", "plain"]
    )
    assert one_line(err) == (
        "block=dbbb: must be one of dbb, plain (did you mean dbb?) "
        "(asked for by configs/experiment/mine.yaml)"
    )


@pytest.mark.parametrize(("overrides", "expected"), TRAIN_REFUSALS, ids=[str(r[0] if isinstance(r, tuple) else r.values[0]) for r in TRAIN_REFUSALS])  # fmt: skip
def test_train_setting_is_refused_in_one_line(compose_cfg, overrides, expected, monkeypatch):
    monkeypatch.setattr(lightning.pytorch.Trainer, "fit", _no_fit)
    with pytest.raises(ConfigError) as info:
        train(compose_cfg("train", *overrides.split()))
    line = one_line(info.value)
    assert "\n" not in line
    assert line.startswith(expected), line


def _no_fit(*args, **kwargs):
    raise AssertionError("a refused setting must fail before training")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            "trainer=ddp",
            "trainer.accelerator=auto: trainer.strategy=ddp on auto needs CUDA GPUs and this machine has none: use trainer=ddp_cpu",
        ),  # fmt: skip
        (
            "trainer=ddp trainer.accelerator=cpu",
            "trainer.sync_batchnorm=true: DistributedDataParallel refuses SyncBatchNorm on CPU",
        ),  # fmt: skip
    ],
)
def test_ddp_without_gpus_is_refused(compose_cfg, overrides, expected):
    with pytest.raises(SettingError) as info:
        validate(compose_cfg("train", *overrides.split()), TRAIN_SCHEMA)
    assert one_line(info.value).startswith(expected)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("deployed", "is already deployed (a deployed.pt written by save_deployed)"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("pickle", "cannot be loaded safely (weights_only)"),
        (
            "other_block",
            "its network has block=dbb, the config block=repvgg: set block=dbb to resume it",
        ),  # fmt: skip
    ],
)
def test_resume_checkpoint_is_checked_before_training(compose_cfg, tmp_path, kind, expected):
    path = _bad_checkpoint(kind, tmp_path)
    with pytest.raises(SettingError) as info:
        validate(compose_cfg("train", f"ckpt_path={path}"), TRAIN_SCHEMA)
    line = one_line(info.value)
    assert line.startswith(f"ckpt_path={path}: ") and expected in line, line
    assert line.count(str(path)) == 1


def test_image_folder_without_validation_split_is_refused(compose_cfg, tmp_path):
    root = image_folder(tmp_path / "images", per_class=5)
    cfg = compose_cfg("train", "data=imagefolder", f"data.root={root}", "data.image_size=8", "data.val_fraction=0.01")  # fmt: skip
    with pytest.raises(SettingError, match="the data has no validation samples: without them no best checkpoint"):  # fmt: skip
        train(cfg)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.EROFS, "paths.output_dir="),
        (errno.ENOSPC, "no space left on the device"),
    ],
)
def test_unwritable_run_folder_is_refused_first(compose_cfg, monkeypatch, code, expected):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(repsqueeze.cli.settings.tempfile, "TemporaryFile", refuse)
    with pytest.raises(SettingError) as info:
        validate(compose_cfg("train"), TRAIN_SCHEMA)
    assert one_line(info.value).startswith("paths.output_dir=")
    assert expected in one_line(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_is_refused(compose_cfg, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(SettingError, match="cannot write in .*Permission denied"):
        validate(compose_cfg("train", f"paths.output_dir={folder}"), TRAIN_SCHEMA)


def test_full_disk_at_a_later_write_is_one_line(tmp_path, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as info:
        export.save_atomic(tmp_path / "model.pt2", lambda f: torch.save({"a": 1}, f))
    assert one_line(info.value, "output_dir") == (
        f"no space left on the device writing {tmp_path / 'model.pt2'}: free disk space, or "
        "set output_dir to a folder on another disk"
    )
    assert list(tmp_path.iterdir()) == []  # nothing half-written left


def test_one_line_of_other_errors():
    writer = RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")  # fmt: skip
    assert one_line(writer).startswith("no space left on the device writing data/0")
    assert one_line(KeyError("state_dict")) == (
        "KeyError: 'state_dict' (HYDRA_FULL_ERROR=1 shows the traceback)"
    )
    assert one_line(ValueError("first\nsecond")) == (
        "ValueError: first (HYDRA_FULL_ERROR=1 shows the traceback)"
    )


def test_copied_setting_is_named_where_it_was_made(compose_cfg):
    cfg = compose_cfg("train", "trainer.max_epochs=abc")
    assert cfg.scheduler.T_max == "abc"  # copied by ${trainer.max_epochs}
    with pytest.raises(SettingError) as info:
        validate(cfg, TRAIN_SCHEMA)
    assert one_line(info.value) == "trainer.max_epochs=abc: must be an integer"


def test_every_config_passes_its_schema(compose_cfg):
    for overrides in ([], ["experiment=dbb_cifar100"], ["experiment=repvgg_cifar10"],
                      ["logger=tensorboard", "scheduler=step", "optimizer=sgd"], ["debug=fdr"],
                      ["trainer=ddp_cpu"], ["data=imagefolder"], ["logger=csv"]):  # fmt: skip
        validate(compose_cfg("train", *overrides), TRAIN_SCHEMA)
    validate(compose_cfg("deploy", "ckpt_path=x.ckpt", "data=digits"), _without_file_checks())


def _without_file_checks() -> Schema:
    rules = dict(DEPLOY_SCHEMA.rules)
    rules["ckpt_path"] = Rule(type=str)
    return Schema(rules, DEPLOY_SCHEMA.closed, DEPLOY_SCHEMA.combinations)


def test_a_new_setting_is_one_line():
    cfg = OmegaConf.create({"a": 1, "b": {"c": 5}})
    schema = Schema({"a": Int(ge=0), "b": Rule(), "b.c": Int(le=3)})
    with pytest.raises(SettingError, match=r"^b.c=5: must be <= 3$"):
        validate(cfg, schema)


DEPLOY_REFUSALS = [
    ("batch_size=0", "batch_size=0: must be a positive integer"),
    ("batch_size=-1", "batch_size=-1: must be a positive integer"),
    ("batch_size=abc", "batch_size=abc: must be an integer"),
    (
        "int8.enabled=true int8.calibration_batches=-2",
        "int8.calibration_batches=-2: must be a positive integer",
    ),  # fmt: skip
    (
        "formats.onnx_opset=7",
        "formats.onnx_opset=7: the installed ONNX exporter writes opsets 18 to",
    ),
    (
        "formats.onnx_opset=99",
        "formats.onnx_opset=99: the installed ONNX exporter writes opsets 18 to",
    ),
    (
        "+model.net.block=repvgg",
        "model.net.block=repvgg: not a setting of this command; settings here: ",
    ),  # fmt: skip
    ("tol.float32=-1", "tol.float32=-1: must be >= 0"),
    ("device=tpu", "device=tpu: must be cpu, cuda or cuda:N"),
    ("seed=abc", "seed=abc: must be an integer"),
    ("measure.min_run_time=0", "measure.min_run_time=0: must be > 0"),
    ("int8.max_drop=2", "int8.max_drop=2: must be <= 1"),
    (
        "int8.calibration_method=foo",
        "int8.calibration_method=foo: must be one of minmax, entropy, percentile",
    ),  # fmt: skip
    ("formats.pt2=maybe", "formats.pt2=maybe: must be true or false"),
    ("input_shape=[1,0,8]", "input_shape=[1,0,8]: give [C,H,W] as positive integers"),
    ("threads=0", "threads=0: must be a positive integer"),
    (
        "data=digits +data.foo=1",
        "data.foo=1: repsqueeze.training.datamodules.DigitsDataModule takes no argument 'foo'",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("overrides", "expected"), DEPLOY_REFUSALS, ids=[o for o, _ in DEPLOY_REFUSALS])  # fmt: skip
def test_deploy_setting_is_refused_in_one_line(compose_cfg, tmp_path, overrides, expected):
    ckpt = tmp_path / "net.ckpt"
    ckpt.write_bytes(b"never read")
    cfg = compose_cfg("deploy", f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'out'}", *overrides.split())  # fmt: skip
    with pytest.raises(SettingError) as info:
        deploy_script.run(cfg)
    line = one_line(info.value)
    assert line.startswith(expected), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.ckpt"]  # nothing written


# --- run hygiene ----------------------------------------------------------------------------


class SendSigterm(Callback):
    """Records the epoch ``last.ckpt`` holds when each epoch starts, and sends this process
    SIGTERM after the first training batch of epoch ``epoch``."""

    def __init__(self, epoch: int = 2) -> None:
        self.epoch = epoch
        self.last_epochs: list[int] = []

    def on_train_epoch_start(self, trainer, *args) -> None:
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            self.last_epochs.append(torch.load(last, weights_only=True)["epoch"])

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


def test_last_checkpoint_every_epoch_and_on_sigterm(compose_cfg, tmp_path):
    """last.ckpt after every epoch, also when the best does not improve (a learning rate too
    small to change val/acc), and when SIGTERM stops training mid-epoch."""
    cfg = compose_cfg("train", *SHORT, "trainer.max_epochs=5", "optimizer.lr=1e-12",
                      f"+callbacks.kill._target_={__name__}.SendSigterm")  # fmt: skip
    with pytest.raises(RunInterrupted) as info:
        train(cfg)
    err = info.value
    (kill,) = [c for c in err.trainer_callbacks if isinstance(c, SendSigterm)]
    assert kill.last_epochs == [0, 1]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert err.exit_code == 143 and err.status == "interrupted"
    assert one_line(err).startswith("training stopped by SIGTERM at epoch 2, step 5; saved ")
    assert f"resume with ckpt_path={last}" in one_line(err)
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (2, 5)  # the state when the signal came
    assert ckpt["val_acc_best"] == err.metrics["val/acc_best"]  # a resumed run starts from it
    runs.close_failed_run(tmp_path, tmp_path, err, sweep=False)  # kept: it has checkpoints
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["error"] == one_line(err, "paths.log_dir")


def test_resumed_run_keeps_its_best_accuracy():
    model = Classifier(NET)
    model.val_acc_best.update(torch.tensor(0.9))
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    resumed = Classifier(NET)
    resumed.on_load_checkpoint(checkpoint)
    resumed.val_acc_best.update(torch.tensor(0.5))  # the sanity check's, before training
    resumed.on_train_start()
    resumed.val_acc_best.update(torch.tensor(0.8))
    assert resumed.val_acc_best.compute() == pytest.approx(0.9)


def test_precision_64_trains_tests_and_deploys(compose_cfg):
    metrics, objects = train(compose_cfg("train", "debug=fdr", "trainer.precision=64"))  # fmt: skip
    assert next(objects["deployed"].parameters()).dtype == torch.float64
    assert metrics["test/max_logit_diff"] < 1e-6 and metrics["latency_ms_deployed"] > 0


def _run_folder(log_dir: Path, name: str) -> Path:
    run_dir = log_dir / "train" / "runs" / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("a: 1\n")
    (run_dir / "train.log").write_text("")
    (run_dir / "csv" / "version_0").mkdir(parents=True)
    (run_dir / "csv" / "version_0" / "hparams.yaml").write_text("a: 1\n")
    return run_dir


def test_failed_run_folder_is_removed_or_marked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"
    ours = _run_folder(logs, f"2026-01-01_00-00-00_{runs.run_id()}")
    err = SettingError("broke")
    runs.close_failed_run(ours, logs, err, sweep=False)
    assert not ours.exists() and not (logs / "train").exists()  # only this run's logs: removed
    ours = _run_folder(logs, f"2026-01-01_00-00-01_{runs.run_id()}")
    (ours / "checkpoints").mkdir()
    (ours / "checkpoints" / "last.ckpt").write_bytes(b"w")
    runs.close_failed_run(ours, logs, err, sweep=False)
    assert json.loads((ours / "metrics.json").read_text()) == {"error": "broke", "status": "failed"}  # fmt: skip
    given = _run_folder(logs, "mine")  # not named by this run (hydra.run.dir=...): kept
    (given / "notes.txt").write_text("mine")
    runs.close_failed_run(given, logs, err, sweep=False)
    assert (given / "notes.txt").read_text() == "mine" and (given / "csv").is_dir()
    job = _run_folder(logs, f"sweep_{runs.run_id()}") / "0"
    job.mkdir()
    runs.close_failed_run(job, logs, err, sweep=True)  # a sweep's job: kept, marked
    assert json.loads((job / "metrics.json").read_text())["status"] == "failed"


def test_sweep_with_a_failed_job_says_so_and_exits_1(tmp_path, capsys):
    for job, metrics in enumerate([{"status": "failed", "error": "seed=abc: must be an integer"},
                                   {"status": "finished", "val/acc_best": 0.9}]):  # fmt: skip
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={job}"]))  # fmt: skip
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(metrics))
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    with pytest.raises(SystemExit) as info:
        cli_train.CompareJobs().on_multirun_end(sweep)
    assert info.value.code == 1
    out = capsys.readouterr()
    assert "failed" in out.out and "finished" in out.out
    assert out.err.strip() == (
        "train.py: error: 1 of 2 jobs failed (jobs 0; each job's metrics.json holds its error)"
    )


def test_resume_continues_in_the_checkpoints_run_folder(tmp_path):
    run_dir = _run_folder(tmp_path / "logs", "2026-01-01_00-00-00_1-abcdef")
    (run_dir / "checkpoints").mkdir()
    last = _checkpoint(run_dir / "checkpoints" / "last.ckpt")
    argv = ["train.py", f"paths.root_dir={tmp_path}", "resume=true", "trainer.max_epochs=9"]
    assert cli_train.resume_argv(argv) == [
        "train.py", f"paths.root_dir={tmp_path}", "trainer.max_epochs=9", f"ckpt_path={last}",
        f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=.hydra/resume-1",
    ]  # fmt: skip
    explicit = cli_train.resume_argv(["train.py", f"ckpt_path={last}"])
    assert f"hydra.run.dir='{run_dir}'" in explicit
    elsewhere = _checkpoint(tmp_path / "loose.ckpt")  # not in a run folder: a new run
    assert cli_train.resume_argv(["train.py", f"ckpt_path={elsewhere}"]) == ["train.py", f"ckpt_path={elsewhere}"]  # fmt: skip
    untouched = ["train.py", "-m", "ckpt_path=last"]
    assert cli_train.resume_argv(untouched) == untouched


# --- end to end (python train.py) ------------------------------------------------------------


def _train_script(tmp_path: Path, *args: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "train.py"), f"paths.root_dir={tmp_path}", *QUIET, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_script_sigterm_then_resume_in_place(tmp_path):
    proc = _train_script(tmp_path, "trainer.max_epochs=200", "test=false", "deploy=false")
    for _ in range(600):
        if list(tmp_path.glob("logs/train/runs/*/checkpoints/last.ckpt")):
            break
        proc.poll()
        assert proc.returncode is None, proc.stderr.read()
        import time

        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert stderr.strip().splitlines()[-1].startswith("train.py: error: training stopped by SIGTERM")  # fmt: skip
    (run_dir,) = tmp_path.glob("logs/train/runs/*")
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    log = (run_dir / "train.log").read_text()
    assert "Received SIGTERM" in log and "GPU available" in log  # Lightning's messages too
    resumed = _train_script(tmp_path, "resume=true", "trainer.max_epochs=3", "test=false", "deploy=false")  # fmt: skip
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-2000:]
    assert list(tmp_path.glob("logs/train/runs/*")) == [run_dir]  # the same folder
    assert (run_dir / ".hydra" / "resume-1" / "config.yaml").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_script_sweep_goes_on_after_a_failed_job(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", f"paths.root_dir={tmp_path}", *QUIET,
         "debug=fdr", "seed=abc,0"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "train.py (job 0): error: seed=abc: must be an integer" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: 1 of 2 jobs failed")
    (sweep,) = tmp_path.glob("logs/debug/multiruns/*")
    assert json.loads((sweep / "1" / "metrics.json").read_text())["status"] == "finished"
