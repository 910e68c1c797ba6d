"""Train a classifier built from re-parameterizable blocks, test it, deploy it, compare.

    python train.py                                            # digits on CPU: about 2 min on 2 cores
    python train.py model.net.block=dbb trainer.max_epochs=5   # any block kind
    python train.py -m model.net.block=plain,repvgg,dbb        # a sweep, compared at the end
    python train.py experiment=repvgg_cifar10 trainer=gpu data.download=true
    python train.py trainer=ddp_cpu trainer.devices=2
    python train.py ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt   # resume

The run directory gets ``checkpoints/{best,last}.ckpt``, ``deployed.pt`` (the deployed
network's weights plus its ``net_config``: ``repsqueeze.load_deployed`` rebuilds it without
the training branches), ``metrics.json`` and ``train.log``. ``deploy.py`` turns a checkpoint
into verified export formats.

The configuration is checked before anything is trained: a mistake (``trainer.max_epochs=0``,
a negative learning rate, missing data, ``model.net.in_channels`` that does not fit the data,
...) is one line ``train.py: error: ...`` naming the override to change, and exit status 1
(the full traceback with ``HYDRA_FULL_ERROR=1``). A run that fails before writing anything
but Hydra's own files leaves no run folder behind.
"""

from __future__ import annotations

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
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from repsqueeze.convert import deploy
from repsqueeze.data import ConfigError
from repsqueeze.export import count_params, latency_ms, save_deployed
from repsqueeze.loggers import RankZeroFilter
from repsqueeze.tables import fmt, table

log = logging.getLogger(__name__)
log.addFilter(RankZeroFilter())  # one copy of each line in a multi-process run
METRICS_FILE = "metrics.json"
# metrics shown per job when a multirun ends (those a job has)
COMPARED = ["val/acc_best", "test/acc", "test/acc_deployed", "test/max_logit_diff"]
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
    check_trainer(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = _instantiate(cfg.data, "data")
    _prepare(datamodule, test=bool(cfg.get("test")))
    fill_from_data(cfg, datamodule)
    model = _instantiate(cfg.model, "model")
    check_optimizer(cfg, model)
    callbacks = [_instantiate(c, "callbacks") for c in _entries(cfg.get("callbacks"))]
    loggers = [_instantiate(c, "logger") for c in _entries(cfg.get("logger"))]
    trainer = _instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    hparams = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)

    net = cfg.model.net
    log.info(f"training {net.get('name')} ({net.get('block')} blocks) in {cfg.paths.output_dir}")
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
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
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
        log.info(", ".join(f"{k} {fmt(v)}" for k, v in sorted(metrics.items())))
    objects = {"datamodule": datamodule, "model": model, "trainer": trainer, "deployed": deployed}
    return metrics, objects


# --- checks before training ------------------------------------------------------------------


def check_trainer(cfg: DictConfig) -> None:
    """Refuses trainer settings under which nothing would be trained, and a missing resume
    checkpoint."""
    trainer = cfg.trainer
    if not trainer.get("fast_dev_run"):  # fast_dev_run overrides the limits below
        for key in ("max_epochs", "max_steps", "limit_train_batches"):
            value = trainer.get(key)
            if value is not None and not isinstance(value, bool) and value == 0:
                raise ConfigError("nothing would be trained", f"trainer.{key}", value)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ConfigError("no such checkpoint file", "ckpt_path", ckpt_path)


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
    lr = optimizer.get("lr")
    if isinstance(lr, int | float) and lr < 0:
        raise ConfigError("the learning rate must be >= 0", "optimizer.lr", lr)
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
        raise ConfigError(err.render("data.", _literal)) from err


def _instantiate(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``; a constructor's refusal becomes :class:`ConfigError`
    naming the config group."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            message = cause.render(f"{group}.", _literal)
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


def _literal(value: Any) -> str:
    """A value as a Hydra override writes it: ``true``, ``null``, ``0.1``, ``data/``."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


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
    x = torch.randn(1, datamodule.in_channels, size, size)
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
    :func:`compare_jobs`) and writes it to ``comparison.md`` in the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = compare_jobs(sweep_dir)
        if not rows:
            return
        (sweep_dir / "comparison.md").write_text(table(rows) + "\n")
        print(f"\n{len(rows)} jobs in {sweep_dir}\n{table(rows, markdown=False)}")


# --- entry point -----------------------------------------------------------------------------


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line; for an error a DataLoader worker re-raised (its
    message then holds the worker's traceback), the original message."""
    text = (err.render(literal=_literal) if isinstance(err, ConfigError) else str(err)).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def remove_if_empty(run_dir: Path, log_dir: Path | None = None) -> bool:
    """Removes a run folder that holds only Hydra's own files (``.hydra/``, ``*.log``) and
    empty folders; anything else (a checkpoint, metrics) keeps it. Then removes the folders
    above it that it leaves empty, up to ``log_dir`` (kept). Returns whether it removed it."""
    run_dir = run_dir.resolve()
    cwd = Path.cwd().resolve()
    if not run_dir.is_dir() or run_dir in (cwd, *cwd.parents):
        return False
    for path in run_dir.rglob("*"):
        relative = path.relative_to(run_dir)
        if path.is_dir() or relative.parts[0] == ".hydra":
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


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Runs :func:`train`; returns ``cfg.optimized_metric`` (for Hydra's sweepers)."""
    try:
        metrics, _ = train(cfg)
    except BaseException as err:
        if os.environ.get("RANK", "0") == "0":
            remove_if_empty(Path(HydraConfig.get().runtime.output_dir), Path(cfg.paths.log_dir))
        if not isinstance(err, ConfigError) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"train.py: error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
