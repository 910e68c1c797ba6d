"""More than one process or machine, on existing engines: ``torchrun`` (gloo on CPU),
Lightning's SLURM environment for ``trainer.num_nodes``, and Hydra's submitit launchers
(``hydra/launcher=slurm`` composes; ``submitit_local`` runs a multirun).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from training_support import QUIET

ROOT = Path(__file__).resolve().parents[2]
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
SHORT += ["trainer.limit_test_batches=1", "data.batch_size=16"]
SLURM = {  # task 3 of 4: the second task on the second of two nodes
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_JOB_ID": "1234",
    "SLURM_JOB_NAME": "train",
    "SLURM_NODELIST": "node[1-2]",
}


def test_lightning_reads_the_slurm_environment(compose_train, monkeypatch):
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    for flag in (rank_zero_only, utils_rank_zero_only):  # the Trainer sets them to 3: restore
        monkeypatch.setattr(flag, "rank", getattr(flag, "rank", 0))
    cfg = compose_train("trainer=ddp_cpu", "trainer.devices=2", "trainer.num_nodes=2")
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank) == (4, 3)
    assert (trainer.node_rank, trainer.local_rank) == (1, 1)
    assert not trainer.is_global_zero  # so train.py neither deploys nor writes metrics here


def test_slurm_launcher_config_follows_the_trainer(compose_train):
    cfg = compose_train(
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=3",
        hydra=True, quiet=False,
    )  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (3, 4, 4)
    local = compose_train("hydra/launcher=submitit_local", hydra=True, quiet=False).hydra.launcher
    assert local._target_.endswith("submitit_launcher.LocalLauncher")


def _train(
    tmp_path: Path, *args: str, prefix: tuple[str, ...] = (), multirun: bool = False
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = [str(ROOT / "train.py"), *(["-m"] if multirun else [])]
    command = [*prefix, *script, f"paths.root_dir={tmp_path}", *QUIET, *args]
    return subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2")
    run = tmp_path / "run"
    result = _train(
        tmp_path, "trainer=ddp_cpu", "trainer.devices=2", f"hydra.run.dir={run}", *SHORT,
        prefix=(*torchrun, "--master_port=29533"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # Lightning's own messages go to the run folder's logs, not the console
    said = result.stderr + "".join(f.read_text() for f in run.rglob("*.log"))
    assert TorchElasticEnvironment.__name__ in said or "GLOBAL_RANK: 1" in said
    assert (run / "deployed.pt").is_file()  # deployed once, by rank 0
    assert json.loads((run / "metrics.json").read_text())["test/max_logit_diff"] < 1e-5
    log = (run / "train.log").read_text()
    assert log.count("training digits_net") == 1  # rank-zero logging


@pytest.mark.slow
def test_submitit_local_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    result = _train(
        tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
        f"hydra.sweep.dir={sweep}", "block=plain,repvgg", *SHORT,
        prefix=(sys.executable,), multirun=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["test/max_logit_diff"] < 1e-5
    assert (sweep / "comparison.md").is_file()
