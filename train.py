"""Train a classifier built from re-parameterizable blocks, test it, deploy it, compare.

    python train.py                                            # digits on CPU: about 2 min on 2 cores
    python train.py model.net.block=dbb trainer.max_epochs=5   # any block kind
    python train.py -m model.net.block=plain,repvgg,dbb        # a sweep, compared at the end
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

import contextlib
import copy
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from repsqueeze.cli import runs  # also registers ${run_id:} for the run folder
from repsqueeze.cli.errors import (
    RunInterrupted,
    SettingError,
    full_error,
    literal,
    one_line,
    report,
    run_main,
)
from repsqueeze.cli.schema import validate
from repsqueeze.cli.settings import TRAIN_SCHEMA, last_checkpoint
from repsqueeze.convert import deploy
from repsqueeze.export import count_params, latency_ms, save_deployed
from repsqueeze.tables import fmt, table
from repsqueeze.training.datasets import ConfigError
from repsqueeze.training.loggers import RankZeroFilter

log = logging.getLogger(__name__)
log.addFilter(RankZeroFilter())  # one copy of each line in a multi-process run
METRICS_FILE = "metrics.json"
FOLDER_SETTING = "paths.log_dir"  # the setting that moves a run's files (in error lines)
LOG_FOLDERS = (".hydra", "csv", "tensorboard")  # a run's own logs (configs/logger/*)
# metrics shown per job when a multirun ends (those a job has)
COMPARED = ["status", "val/acc_best", "test/acc", "test/acc_deployed", "test/max_logit_diff"]
COMPARED += ["params", "params_deployed", "latency_ms", "latency_ms_deployed"]


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks the config, fits, tests the best checkpoint (training and deployed form),
    deploys and saves.

    Args:
        cfg: the composed ``configs/train.yaml``. ``model.net.num_classes`` and
            ``model.net.in_channels`` left ``null`` are filled in from the data module.

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
    datamodule = _instantiate(cfg.data, "data")
    _prepare(datamodule, test=bool(cfg.get("test")))
    fill_from_data(cfg, datamodule)
    model = _instantiate(cfg.model, "model")
    check_optimizer(cfg, model)
    check_forward(cfg, model, datamodule)
    callbacks = [_instantiate(c, "callbacks") for c in _entries(cfg.get("callbacks"))]
    loggers = [_instantiate(c, "logger") for c in _entries(cfg.get("logger"))]
    trainer = _instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)

    net = cfg.model.net
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
        deployed, summary = _deploy_and_compare(model, datamodule, metrics, cfg.paths.output_dir)
        metrics.update(summary)
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {**metrics, "status": "finished"}
        (out / METRICS_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        log.info(", ".join(f"{k} {fmt(v)}" for k, v in sorted(metrics.items())))
    objects = {"datamodule": datamodule, "model": model, "trainer": trainer, "deployed": deployed}
    return metrics, objects


# --- checks before training ------------------------------------------------------------------


def fill_from_data(cfg: DictConfig, datamodule: L.LightningDataModule) -> None:
    """Sets ``model.net.num_classes`` and ``model.net.in_channels`` to the data module's
    where they are ``null``; a value that contradicts the data raises :class:`ConfigError`
    naming both the model override and the data."""
    data_name = _choice("data") or cfg.data.get("_target_", "?").rsplit(".", 1)[-1]
    for key, what in (("num_classes", "classes"), ("in_channels", "input channels")):
        expected = getattr(datamodule, key, None)
        given = cfg.model.net.get(key)
        if given is None:
            if expected is None:
                raise ConfigError(
                    f"the data (data={data_name}) does not tell its {what}; give it",
                    f"model.net.{key}",
                    given,
                )
            with open_dict(cfg.model.net):
                cfg.model.net[key] = expected
        elif expected is not None and given != expected:
            raise ConfigError(
                f"the data (data={data_name}) has {expected} {what}; leave it null to take "
                f"the data's, or choose data with {given} {what}",
                f"model.net.{key}",
                given,
            )


def check_optimizer(cfg: DictConfig, model: L.LightningModule) -> None:
    """Builds the optimizer and scheduler once, so that their arguments fail here."""
    optimizer = cfg.get("optimizer") or {}
    try:
        model.configure_optimizers()
    except (TypeError, ValueError) as err:
        target = optimizer.get("_target_", "the optimizer")
        raise ConfigError(
            f"{target} (or the scheduler) refuses its arguments: {err}; "
            "check the optimizer.* and scheduler.* overrides"
        ) from err


def _prepare(datamodule: L.LightningDataModule, test: bool) -> None:
    """Downloads (when asked) and loads the data now, so that missing or unreadable data
    fails before the trainer starts. Lightning's own calls find it done."""
    try:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # Lightning's prepare_data convention
            datamodule.prepare_data()
        datamodule.setup("fit")
        if test:
            datamodule.setup("test")
    except ConfigError as err:
        raise ConfigError(err.render("data.", literal)) from err
    val_set = getattr(datamodule, "val_set", None)
    if val_set is not None and len(val_set) == 0:
        raise SettingError(
            "the data has no validation samples: without them no best checkpoint is chosen "
            "and the test and deploy check would run on the last weights; give the data a "
            "validation split (data.val_fraction, data.val_size, or a root/val folder)",
            "data",
        )


def check_forward(cfg: DictConfig, model: L.LightningModule, datamodule: L.LightningDataModule) -> None:  # fmt: skip
    """Runs a copy of the network in training mode on two training samples, so that a
    network that cannot train on this data (``model.mode=online`` with BatchNorm in the
    branches, an input too small for the stem, ...) fails here, not after the trainer starts.
    Data modules without a ``train_set`` are not checked."""
    dataset = getattr(datamodule, "train_set", None)
    if dataset is None or len(dataset) < 2:
        return
    x = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(2)])  # (2, C, H, W)
    net = copy.deepcopy(model.net).train()  # the model's own BatchNorm statistics stay
    try:
        with torch.no_grad():
            net(x)
    except (ValueError, RuntimeError, TypeError, IndexError) as err:
        mode = cfg.model.get("mode")
        key, value = ("model.mode", mode) if mode == "online" else ("model.net.name", cfg.model.net.name)  # fmt: skip
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingError(f"the network cannot train on this data: {reason}", key, value) from err


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


def _instantiate(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``; a constructor's refusal becomes :class:`ConfigError`
    naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            message = cause.render(f"{group}.", literal)
            raise ConfigError(message) from cause
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(err)
        raise ConfigError(f"{group}: {reason.splitlines()[0]}") from err


def _entries(group: DictConfig | None) -> list[DictConfig]:
    """The ``_target_`` entries of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    return [c for c in (group or {}).values() if c and "_target_" in c]


def _choice(group: str) -> str | None:
    """The option chosen for a config group (``data=cifar10`` -> ``cifar10``) in a Hydra run."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


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
    checkpoint = torch.load(path, map_location=model.device, weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])


def _deploy_and_compare(
    model: L.LightningModule, datamodule: L.LightningDataModule, metrics: dict, output_dir: str
) -> tuple[nn.Module, dict[str, float]]:
    """Deploys a CPU copy of ``model.net``, saves it, and logs training vs deployed form."""
    net = copy.deepcopy(model.net).cpu().eval()
    deployed = deploy(net).eval()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_deployed(deployed, out / "deployed.pt", model.hparams.net_config)

    size = getattr(datamodule, "image_size", None) or 32
    dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
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
    for path in Path(sweep_dir).glob(f"*/{METRICS_FILE}"):
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


def remove_if_empty(run_dir: Path, log_dir: Path | None = None) -> bool:
    """Removes a run folder that this run named (its name ends in this process's
    :func:`~repsqueeze.cli.runs.run_id`: a folder given with ``hydra.run.dir`` is never
    removed) and that holds only this run's logs (``.hydra/``, ``*.log``, the loggers'
    :data:`LOG_FOLDERS`) and empty folders; anything else (a checkpoint, metrics) keeps it.
    Then removes the folders above it that it leaves empty, up to ``log_dir`` (kept).
    Returns whether it removed it."""
    run_dir = run_dir.resolve()
    cwd = Path.cwd().resolve()
    if not run_dir.is_dir() or run_dir in (cwd, *cwd.parents):
        return False
    if not runs.named_by_this_run(run_dir):
        return False
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if path.is_dir() or relative.parts[0] in LOG_FOLDERS:
            continue
        if len(relative.parts) == 1 and path.suffix == ".log":
            continue
        return False
    shutil.rmtree(run_dir)
    stop = log_dir.resolve() if log_dir is not None else None
    parent = run_dir.parent
    while stop is not None and stop in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True


def close_failed_run(run_dir: Path, log_dir: Path, err: BaseException, sweep: bool) -> None:
    """After a failure: a run folder that holds nothing but logs is removed (see
    :func:`remove_if_empty`; in a sweep it is kept, for the comparison to list the job);
    any other is kept, with ``metrics.json`` saying how the run ended (``status``
    ``failed`` or ``interrupted``, the one-line ``error``, and the metrics logged so far)."""
    if not sweep and remove_if_empty(run_dir, log_dir):
        return
    if not run_dir.is_dir():
        return
    metrics = {**getattr(err, "metrics", {}), "status": getattr(err, "status", "failed")}
    metrics["error"] = one_line(err, FOLDER_SETTING)
    with contextlib.suppress(OSError):  # a full or read-only disk: the error line says so
        (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Runs :func:`train`; returns ``cfg.optimized_metric`` (for Hydra's sweepers). A failure
    is one line and exit status 1 (143 after SIGTERM); in a sweep (``-m``) the line names the
    job and the sweep goes on (:class:`CompareJobs` reports the failed jobs and exits 1)."""
    try:
        metrics, _ = train(cfg)
    except BaseException as err:
        hydra_cfg = HydraConfig.get()
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        if os.environ.get("RANK", "0") == "0":
            close_failed_run(Path(hydra_cfg.runtime.output_dir), Path(cfg.paths.log_dir), err, sweep)  # fmt: skip
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
        with initialize_config_dir(str(Path(__file__).parent / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[o for o in overrides if not o.startswith("hydra.")])
            return last_checkpoint(cfg.paths.log_dir, cfg.task_name)
    except Exception:  # a bad override: Hydra reports it when it composes for the run
        return None


if __name__ == "__main__":
    sys.argv = resume_argv(sys.argv)
    run_main(main, "train.py", FOLDER_SETTING)
