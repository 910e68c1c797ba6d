"""Run hygiene of train.py: ``last.ckpt`` every epoch and on SIGTERM, resume in place,
failed runs removed or marked, sweeps that go on past a failed job.

Runs that end early are checked on tiny digits runs in-process; the ``slow`` ones run
``python train.py`` as a user would.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from deploy_support import write_checkpoint
from lightning.pytorch import Callback
from omegaconf import OmegaConf
from training_support import QUIET

from repsqueeze.cli import runs
from repsqueeze.cli import train as cli_train
from repsqueeze.cli.errors import RunInterrupted, SettingError, one_line
from repsqueeze.cli.train import train
from repsqueeze.training.lit import Classifier

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
SHORT += ["test=false", "deploy=false"]
NET = {"name": "digits_net", "block": "repvgg", "num_classes": 10, "in_channels": 1}

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
    last = write_checkpoint(run_dir / "checkpoints" / "last.ckpt", NET)
    argv = ["train.py", f"paths.root_dir={tmp_path}", "resume=true", "trainer.max_epochs=9"]
    assert cli_train.resume_argv(argv) == [
        "train.py", f"paths.root_dir={tmp_path}", "trainer.max_epochs=9", f"ckpt_path={last}",
        f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=.hydra/resume-1",
    ]  # fmt: skip
    explicit = cli_train.resume_argv(["train.py", f"ckpt_path={last}"])
    assert f"hydra.run.dir='{run_dir}'" in explicit
    elsewhere = write_checkpoint(tmp_path / "loose.ckpt", NET)  # not in a run folder: a new run
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
