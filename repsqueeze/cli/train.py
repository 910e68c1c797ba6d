"""``train.py``: train a classifier built from re-parameterizable blocks, test it, deploy it,
compare. The root ``train.py`` runs :func:`main`; tests and tools call :func:`train`.

    python train.py                                            # digits on CPU: about 2 min on 2 cores
    python train.py block=dbb trainer.max_epochs=5             # any block kind
    python train.py -m block=plain,repvgg,dbb                  # a sweep, compared at the end
    python train.py experiment=repvgg_cifar10 trainer=gpu data.download=true
    python train.py trainer=ddp_cpu trainer.devices=2
    python train.py resume=true                                # continue the newest run, in its folder

The run directory gets ``checkpoints/{best,last}.ckpt``, ``deployed.pt`` (the deployed
network's weights plus its ``net_config``: ``repsqueeze.load_deployed`` rebuilds it without
the training branches), ``metrics.json`` and ``train.log``. ``deploy.py`` turns a checkpoint
into verified export formats.

Every setting is checked against the schema (:mod:`repsqueeze.cli.settings`) before
anything is trained, and every failure is one line ``train.py: error: ...`` naming the
override or file to change, exit status 1 (143 after SIGTERM, with ``last.ckpt`` saved and
``metrics.json`` saying so); the full traceback with ``HYDRA_FULL_ERROR=1``. A failed run's
folder is removed when it holds only this run's logs, else kept and marked failed. See
docs/configuration.md.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from repsqueeze.checkpoints import read_checkpoint
from repsqueeze.cli import runs  # also registers ${run_id:} for the run folder
from repsqueeze.cli.errors import RunInterrupted, full_error, report, run_main
from repsqueeze.cli.preflight import (
    check_forward,
    check_optimizer,
    entries,
    instantiate_group,
    net_from_data,
    prepare,
)
from repsqueeze.cli.schema import validate
from repsqueeze.cli.settings import TRAIN_SCHEMA, last_checkpoint
from repsqueeze.export import count_params, save_deployed
from repsqueeze.tables import fmt, table
from repsqueeze.timing import latency_ms
from repsqueeze.training.callbacks import dtype_of
from repsqueeze.training.loggers import RankZeroFilter

log = logging.getLogger(__name__)
log.addFilter(RankZeroFilter())  # one copy of each line in a multi-process run
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
FOLDER_SETTING = "paths.log_dir"  # the setting that moves a run's files (in error lines)
# metrics shown per job when a multirun ends (those a job has)
COMPARED = ["status", "val/acc_best", "test/acc", "test/acc_deployed", "test/max_logit_diff"]
COMPARED += ["params", "params_deployed", "latency_ms", "latency_ms_deployed"]


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks the config, fits, tests the best checkpoint (training and deployed form),
    saves the deployed network and compares the two forms. The network is deployed once:
    the test's check (:class:`~repsqueeze.training.callbacks.DeployCheck`) deploys it, and
    that deployed network is the one saved; ``cfg`` is not changed.

    Args:
        cfg: the composed ``configs/train.yaml``. ``model.net.num_classes`` and
            ``model.net.in_channels`` left ``null`` are taken from the data module.

    Returns:
        ``(metrics, objects)``: the logged metrics plus the deploy summary, and the
        datamodule, model, trainer and deployed network (``None`` when not deployed here).

    Raises:
        ConfigError: a setting that cannot work, named as the override to change; raised
            before anything is trained.
    """
    validate(cfg, TRAIN_SCHEMA)  # every setting, before any work
    _route_lightning_logs()
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = _build(cfg)
    net = model.hparams.net_config or {}
    log.info(f"training {net.get('name')} ({net.get('block')} blocks) in {cfg.paths.output_dir}")
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SystemExit as err:  # SIGTERMException, or Lightning's exit after Ctrl-C
        raise _interrupted(trainer, err) from err
    metrics = _metrics(trainer)
    _load_best(trainer, model)
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule)
        metrics.update(_metrics(trainer))

    deployed = None
    if cfg.get("deploy") and trainer.is_global_zero:
        deployed, summary = _save_deployed(model, datamodule, metrics, cfg.paths.output_dir)
        metrics.update(summary)
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {**metrics, "status": "finished"}
        (out / runs.METRICS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        log.info(", ".join(f"{k} {fmt(v)}" for k, v in sorted(metrics.items())))
    objects = {"datamodule": datamodule, "model": model, "trainer": trainer, "deployed": deployed}
    return metrics, objects


def _build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """The data module (loaded now), the model (its classes and channels from the data,
    given when it is built), the optimizer and the network checked, and the trainer with
    its callbacks and loggers; the loggers get the resolved config as hyperparameters.
    Built from a copy: Hydra resolves a node reference such as ``model.scheduler:
    ${scheduler}`` in place, and ``cfg`` stays as composed."""
    cfg = copy.deepcopy(cfg)
    datamodule = instantiate_group(cfg.data, "data")
    prepare(datamodule, test=bool(cfg.get("test")))
    from_data = net_from_data(cfg, datamodule)
    model = instantiate_group(cfg.model, "model", net=from_data)
    check_optimizer(cfg, model)
    check_forward(cfg, model, datamodule)
    callbacks = [instantiate_group(c, "callbacks") for c in entries(cfg.get("callbacks"))]
    loggers = [instantiate_group(c, "logger") for c in entries(cfg.get("logger"))]
    trainer = instantiate_group(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)  # fmt: skip
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["model"]["net"].update(from_data)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
    return datamodule, model, trainer


def _route_lightning_logs() -> None:
    """Sends Lightning's messages (the deploy check line, signal notices, ...) through the
    root logger, so that Hydra's ``train.log`` holds them too; Lightning gave its loggers their
    own console handler when it was imported, before Hydra set logging up."""
    if not HydraConfig.initialized():
        return
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


def _interrupted(trainer: L.Trainer, err: SystemExit) -> RunInterrupted:
    """The error for a fit stopped by SIGTERM or Ctrl-C; the last-checkpoint callback saved
    ``last.ckpt`` first (``save_on_exception``)."""
    what = "SIGTERM" if isinstance(err, SIGTERMException) else "an interrupt (Ctrl-C)"
    folders = [
        c.dirpath for c in trainer.checkpoint_callbacks if c.filename == "last" and c.dirpath
    ]
    path = Path(folders[0]) / "last.ckpt" if folders else None
    if path is not None and path.is_file():
        where = f"saved {path}; resume with ckpt_path={path} (or resume=true)"
    else:
        where = "no last.ckpt saved (callbacks.last_checkpoint saves it)"
    message = f"training stopped by {what} at epoch {trainer.current_epoch}, step {trainer.global_step}; {where}"  # fmt: skip
    log.warning(message)
    error = RunInterrupted(message)
    error.metrics = _metrics(trainer)
    error.trainer_callbacks = trainer.callbacks
    return error


# --- after training --------------------------------------------------------------------------


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    return {k: v.item() for k, v in trainer.callback_metrics.items()}


def _load_best(trainer: L.Trainer, model: L.LightningModule) -> None:
    """Loads the best checkpoint's weights into ``model``; keeps the current ones without one."""
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    if not path:
        log.info("no best checkpoint (fast_dev_run or no ModelCheckpoint): using current weights")
        return
    log.info(f"loading the best checkpoint: {path}")
    model.load_state_dict(read_checkpoint(path).state_dict)


def _save_deployed(
    model: L.LightningModule, datamodule: L.LightningDataModule, metrics: dict, output_dir: str
) -> tuple[nn.Module, dict[str, float]]:
    """Saves the deployed network the test checked (deploying it now when there was no test)
    as ``deployed.pt``, and logs training vs deployed form on the CPU."""
    check = model.deploy_check
    deployed = check.deployed if check.deployed is not None else check.deploy(model.net)
    deployed = deployed.cpu().eval()
    net = copy.deepcopy(model.net).cpu().eval()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_deployed(deployed, out / "deployed.pt", model.hparams.net_config)

    size = getattr(datamodule, "image_size", None) or 32
    dtype = dtype_of(net)
    x = torch.randn(1, datamodule.in_channels, size, size, dtype=dtype)  # float64 with precision=64
    summary = {
        "params": count_params(net),
        "params_deployed": count_params(deployed),
        "latency_ms": latency_ms(lambda: net(x), repeats=30, warmup=5),
        "latency_ms_deployed": latency_ms(lambda: deployed(x), repeats=30, warmup=5),
    }
    rows = [
        ("parameters", summary["params"], summary["params_deployed"]),
        ("CPU latency, batch 1 (ms)", summary["latency_ms"], summary["latency_ms_deployed"]),
        ("test accuracy", metrics.get("test/acc"), metrics.get("test/acc_deployed")),
        ("max logit diff (rel.)", "", metrics.get("test/max_logit_diff")),
    ]
    text = table(rows, ["", "training form", "deployed"], markdown=False)
    log.info(f"training form vs deployed\n{text}\nsaved {out / 'deployed.pt'}")
    return deployed, summary


# --- multirun comparison ---------------------------------------------------------------------


def compare_jobs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished job of a multirun: the overrides that differ between jobs, then
    the :data:`COMPARED` metrics from each job's ``metrics.json``."""
    jobs = []
    for path in Path(sweep_dir).glob(f"*/{runs.METRICS_FILE}"):
        overrides_file = path.parent / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        pairs = dict(str(o).split("=", 1) for o in overrides if "=" in str(o))
        jobs.append((path.parent.name, pairs, json.loads(path.read_text())))
    jobs.sort(key=lambda job: (not job[0].isdigit(), int(job[0]) if job[0].isdigit() else 0, job[0]))  # fmt: skip
    keys = sorted({k for _, pairs, _ in jobs for k in pairs})
    varying = [k for k in keys if len({pairs.get(k) for _, pairs, _ in jobs}) > 1]
    shown = [m for m in COMPARED if any(m in metrics for *_, metrics in jobs)]
    return [
        {"job": name, **{k: pairs.get(k) for k in varying}, **{m: metrics.get(m) for m in shown}}
        for name, pairs, metrics in jobs
    ]


class CompareJobs(Callback):
    """Hydra callback: when a multirun ends, prints a table of every job's metrics (see
    :func:`compare_jobs`) and writes it to ``comparison.md`` in the sweep folder; when a job
    failed, says which, and exits with status 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = compare_jobs(sweep_dir)
        if not rows:
            return
        (sweep_dir / "comparison.md").write_text(table(rows) + "\n")
        print(f"\n{len(rows)} jobs in {sweep_dir}\n{table(rows, markdown=False)}")
        failed = [row["job"] for row in rows if row.get("status") not in (None, "finished")]
        if failed:
            print(
                f"train.py: error: {len(failed)} of {len(rows)} jobs failed (jobs "
                f"{', '.join(failed)}; each job's metrics.json holds its error)",
                file=sys.stderr,
            )
            sys.exit(1)


# --- entry point -----------------------------------------------------------------------------


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Runs :func:`train`; returns ``cfg.optimized_metric`` (for Hydra's sweepers). A failure
    is one line and exit status 1 (143 after SIGTERM); in a sweep (``-m``) the line names the
    job and the sweep goes on (:class:`CompareJobs` reports the failed jobs and exits 1)."""
    try:
        metrics, _ = train(cfg)
    except BaseException as err:
        hydra_cfg = HydraConfig.get()
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        if os.environ.get("RANK", "0") == "0":
            runs.close_failed_run(Path(hydra_cfg.runtime.output_dir), Path(cfg.paths.log_dir), err, sweep, FOLDER_SETTING)  # fmt: skip
        if full_error():
            raise
        prog = f"train.py (job {hydra_cfg.job.num})" if sweep else "train.py"
        status = report(prog, err, FOLDER_SETTING)
        if sweep and not isinstance(err, KeyboardInterrupt):
            return None
        sys.exit(status)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


def resume_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``ckpt_path=last`` (or ``resume=true``) replaced by the newest
    ``last.ckpt`` of this task's runs, and, when the checkpoint is in a run folder that
    ``train.py`` made, that folder as the run folder (``hydra.run.dir``), with this run's
    config saved beside the first one's in ``.hydra/resume-N``: the run continues where it
    stopped, and its checkpoint callbacks find their own state (best score and path) again.
    Unchanged for sweeps and when ``hydra.run.dir`` is given."""
    args = argv[1:]
    if any(a in ("-m", "--multirun") or a.startswith("hydra.run.dir=") for a in args):
        return argv
    given = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    ckpt = given.get("ckpt_path")
    resume = given.get("resume", "false").lower() == "true"
    if ckpt in (None, "null") and not resume:
        return argv
    args = [a for a in args if not a.startswith(("ckpt_path=", "resume="))]
    if ckpt in (None, "null", "last"):
        found = _newest_last(args)
        ckpt = str(found) if found is not None else "last"  # validation names what is missing
    args.append(f"ckpt_path={ckpt}")
    run_dir = Path(ckpt).resolve().parent.parent
    if (run_dir / ".hydra" / "config.yaml").is_file():
        n = 1 + sum(1 for _ in run_dir.glob(".hydra/resume-*"))
        args += [f"hydra.run.dir='{run_dir}'", f"hydra.output_subdir=.hydra/resume-{n}"]
    return [argv[0], *args]


def _newest_last(overrides: list[str]) -> Path | None:
    """The newest ``runs/*/checkpoints/last.ckpt`` of the task the overrides compose to."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
            return last_checkpoint(cfg.paths.log_dir, cfg.task_name)
    except Exception:  # a bad override: Hydra reports it when it composes for the run
        return None


def main() -> None:
    """The ``train.py`` command line: :func:`resume_argv`, then :func:`hydra_main`, with
    every failure one line (:func:`repsqueeze.cli.errors.run_main`)."""
    sys.argv = resume_argv(sys.argv)
    run_main(hydra_main, "train.py", FOLDER_SETTING)
