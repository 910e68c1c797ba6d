"""What the command-line probes (:mod:`benchmarks.cli_probes`) set up before a run and check
after it: checkpoints and files written in a subprocess of the checkout under test, small
tmpfs mounts (root only), and the outcome checks of runs that should work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

SHORT = [
    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1", "callbacks.progress_bar.refresh_rate=0", "logger=none",
]  # fmt: skip


def probe_env(root: Path) -> dict[str, str]:
    """The environment of a probe's process: the checkout ``root`` first on the path."""
    return {**os.environ, "PYTHONPATH": str(root), "HYDRA_FULL_ERROR": "0"}


def checkpoint(tmp: Path, root: Path, block: str = "repvgg", name: str = "net.ckpt") -> Path:
    """A train.py-style checkpoint of an untrained digits network, written in a subprocess."""
    path = tmp / name
    code = (
        "import sys, torch; from repsqueeze.training.lit import Classifier;"
        f"m = Classifier({{'name': 'digits_net', 'block': '{block}', 'num_classes': 10,"
        " 'in_channels': 1}); torch.save({'state_dict': m.state_dict(),"
        " 'hyper_parameters': dict(m.hparams), 'pytorch-lightning_version': '2.6'},"
        f" '{path}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=probe_env(root), cwd=tmp)
    return path


def deployed(tmp: Path, root: Path) -> list[str]:
    code = (
        "import torch; from repsqueeze import deploy, save_deployed, create_model;"
        "cfg = {'name': 'digits_net', 'block': 'repvgg', 'num_classes': 10, 'in_channels': 1};"
        f"save_deployed(deploy(create_model(**cfg)).eval(), '{tmp / 'deployed.pt'}', cfg)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=probe_env(root), cwd=tmp)
    return [f"ckpt_path={tmp / 'deployed.pt'}"]


def truncated(tmp: Path, root: Path) -> list[str]:
    path = checkpoint(tmp, root)
    path.write_bytes(path.read_bytes()[:1000])
    return [f"ckpt_path={path}"]


def pickle(tmp: Path, root: Path) -> list[str]:
    code = (
        "import torch, argparse; torch.save({'state_dict': argparse.Namespace(a=1)},"
        f" '{tmp / 'evil.ckpt'}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=probe_env(root), cwd=tmp)
    return [f"ckpt_path={tmp / 'evil.ckpt'}"]


def ckpt(block: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, root: [f"ckpt_path={checkpoint(tmp, root, block)}"]


def images(tmp: Path, root: Path) -> list[str]:
    code = (
        "import numpy as np, pathlib; from PIL import Image; r = np.random.default_rng(0)\n"
        "for c in ('ant', 'bee'):\n"
        f"    d = pathlib.Path('{tmp}/images') / c; d.mkdir(parents=True)\n"
        "    for i in range(6): Image.fromarray(r.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f'{i}.png')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=probe_env(root), cwd=tmp)
    return [f"data.root={tmp / 'images'}", "data.image_size=8", "data.num_workers=0"]


def mount(tmp: Path, options: str) -> Path:
    folder = tmp / "mnt"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
    return folder


def full_disk(tmp: Path, root: Path) -> list[str]:
    folder = mount(tmp, "size=400k")
    return [f"paths.log_dir={folder}", f"hydra.run.dir={folder}/run"]


def full_disk_deploy(tmp: Path, root: Path) -> list[str]:
    path = checkpoint(tmp, root)
    folder = mount(tmp, "size=300k")
    return [f"ckpt_path={path}", f"output_dir={folder}/out"]


def read_only(tmp: Path, root: Path) -> list[str]:
    folder = mount(tmp, "size=1m")
    (folder / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return [f"hydra.run.dir={folder}/run"]


def user_folder(tmp: Path, root: Path) -> list[str]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine")
    return [f"hydra.run.dir={tmp / 'mine'}"]


def run_metrics(tmp: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in tmp.glob("logs/**/metrics.json")]


def last_is_last(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    import torch

    (last,) = tmp.glob("logs/**/last.ckpt")
    return torch.load(last, weights_only=True, map_location="cpu")["epoch"] == 2


def precision64(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    return any("latency_ms_deployed" in m for m in run_metrics(tmp))


def interrupted(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    metrics = run_metrics(tmp)
    saved = list(tmp.glob("logs/**/last.ckpt"))
    return result.returncode != 0 and bool(saved) and any(m.get("status") for m in metrics)


def train_log(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    (log,) = tmp.glob("logs/**/train.log")
    text = log.read_text()
    return "Deploy check" in text and "GPU available" in text


def sweep_goes_on(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    return result.returncode != 0 and len(run_metrics(tmp)) >= 1


def no_half_folder(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    """A failed run leaves no folder, or one that says it failed."""
    runs = [p for p in tmp.glob("logs/train/runs/*") if p.is_dir()]
    return result.returncode == 1 and all((r / "metrics.json").is_file() for r in runs)


def resume(tmp: Path, root: Path) -> list[str]:
    """A first run of 3 epochs; the probe then resumes it to 4 epochs with ckpt_path=last."""
    first = [*SHORT[1:], "trainer.max_epochs=3", "trainer.limit_train_batches=4"]
    subprocess.run(
        [sys.executable, str(root / "train.py"), f"paths.root_dir={tmp}", *first, "test=false", "deploy=false"],  # fmt: skip
        cwd=tmp, env=probe_env(root), capture_output=True, check=True,
    )  # fmt: skip
    return []


def resumed_in_place(tmp: Path, result: subprocess.CompletedProcess) -> bool:
    import torch

    runs = [p for p in tmp.glob("logs/train/runs/*") if p.is_dir()]
    if result.returncode != 0 or len(runs) != 1:
        return False
    last = torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    return last["epoch"] == 3 and last["global_step"] == 16
