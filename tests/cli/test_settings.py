"""The settings schema of both command lines.

Every bad setting is refused by :func:`repsqueeze.cli.schema.validate` (or the checks right
after it) before anything is trained or written, as one line naming the setting; these tests
compose the real configs and call ``train(cfg)`` / ``deploy.run(cfg)`` in-process. Run
hygiene (SIGTERM, resume, failed runs, sweeps) is in ``test_run_hygiene.py``.
"""

import errno
import os
from pathlib import Path

import lightning.pytorch
import pytest
import torch
from deploy_support import write_checkpoint
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf
from training_support import image_folder

import repsqueeze.cli.settings
from repsqueeze import export
from repsqueeze.cli import deploy as deploy_script
from repsqueeze.cli.errors import SettingError, one_line
from repsqueeze.cli.schema import Int, Rule, Schema, validate
from repsqueeze.cli.settings import DEPLOY_SCHEMA, TRAIN_SCHEMA
from repsqueeze.cli.train import train
from repsqueeze.models import create_model
from repsqueeze.surgery import deploy
from repsqueeze.training.datasets import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
SHORT += ["test=false", "deploy=false"]
NET = {"name": "digits_net", "block": "repvgg", "num_classes": 10, "in_channels": 1}


def _bad_checkpoint(kind: str, tmp_path: Path) -> Path:
    if kind == "deployed":
        net = deploy(create_model(**NET)).eval()
        export.save_deployed(net, tmp_path / "deployed.pt", NET)
        return tmp_path / "deployed.pt"
    if kind == "truncated":
        path = write_checkpoint(tmp_path / "t.ckpt", NET)
        path.write_bytes(path.read_bytes()[:1000])
        return path
    if kind == "pickle":
        from argparse import Namespace  # a class weights_only=True refuses to build

        torch.save({"state_dict": Namespace(a=1)}, tmp_path / "p.ckpt")
        return tmp_path / "p.ckpt"
    return write_checkpoint(tmp_path / "dbb.ckpt", {**NET, "block": "dbb"})


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
