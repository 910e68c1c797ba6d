"""``python deploy.py`` in a subprocess, as a user runs it: one-line errors, and (``slow``)
a digits run trained with ``train(cfg)`` for a few epochs, then deployed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from deploy_support import (
    ARTIFACTS,
    BAD_FILES,
    FAST,
    NET_CONFIG,
    TOL32,
    bad_file,
    check_report,
    listing,
    no_outputs,
    write_checkpoint,
)
from helpers import randomize_bn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch import nn

from repsqueeze import export
from repsqueeze import files as folders
from repsqueeze.cli import deploy as cli_deploy
from repsqueeze.cli.train import train
from repsqueeze.training.lit import Classifier

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


# --- subprocess: python deploy.py ----------------------------------------------------------
def _run_deploy(
    tmp_path: Path, *overrides: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python deploy.py`` from the repository root; Hydra's own files go to tmp_path."""
    command = [
        sys.executable,
        str(ROOT / "deploy.py"),
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "measure.min_run_time=0.01",
        *overrides,
    ]
    env = {
        **{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def _assert_one_line_error(result: subprocess.CompletedProcess, match: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("deploy.py: error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert match in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", BAD_FILES)
def test_script_refuses_bad_files(tmp_path, kind):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    result = _run_deploy(tmp_path, f"ckpt_path={bad_file(kind, inputs)}", f"output_dir={out}")
    _assert_one_line_error(result, BAD_FILES[kind])
    assert not (inputs / "MARKER").exists()
    no_outputs(out)
    assert "written to" not in result.stdout


def test_script_without_ckpt_path_is_a_one_line_error(tmp_path):
    """Bug: ``cfg.ckpt_path`` is ``???``; omegaconf's MissingMandatoryValue escapes ``main``
    and Hydra prints a traceback."""
    result = _run_deploy(tmp_path, f"output_dir={tmp_path / 'out'}")
    _assert_one_line_error(result, "ckpt_path")


def test_entry_errors_are_one_line_unless_asked(
    compose_deploy, checkpoint, tmp_path, capsys, monkeypatch
):
    """What ``main`` runs: an output_dir that is a file is one line on stderr and status 1;
    an unexpected exception too, with its type; with HYDRA_FULL_ERROR=1 the traceback."""
    taken = tmp_path / "taken"
    taken.write_text("")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={taken}")
    assert cli_deploy.entry(cfg) == 1
    assert capsys.readouterr().err == (
        f"deploy.py: error: output_dir {taken} is a file, not a folder\n"
    )

    def bug(_cfg):
        raise KeyError("state_dict")

    monkeypatch.setattr(cli_deploy, "run", bug)
    assert cli_deploy.entry(cfg) == 1
    err = capsys.readouterr().err
    assert err.startswith("deploy.py: error: KeyError: 'state_dict' (HYDRA_FULL_ERROR=1")
    assert err.count("\n") == 1
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(KeyError):
        cli_deploy.entry(cfg)


@pytest.mark.gpu
def test_a_checkpoint_trained_on_the_gpu_deploys_on_a_cpu_only_machine(tmp_path):
    """One SGD step on CUDA, saved with its CUDA tensors; deploy.py with no GPU visible
    loads it on the CPU; deploy.py with device=cuda verifies on the GPU with TF32 on
    globally (strict_fp32 turns it off for the comparison)."""
    model = Classifier(NET_CONFIG).cuda()
    randomize_bn(model.net, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    nn.functional.cross_entropy(model.net(x), y).backward()
    optimizer.step()
    ckpt = tmp_path / "run" / "checkpoints" / "gpu.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    assert next(iter(torch.load(ckpt, weights_only=True)["state_dict"].values())).is_cuda

    out = tmp_path / "out"
    common = [f"ckpt_path={ckpt}", "input_shape=[1,8,8]"]
    result = _run_deploy(
        tmp_path,
        *common,
        "formats.onnx=false",
        f"output_dir={out}",
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert "CPU: no TF32" in report["numerics"]
    net = model.net.cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(
            export.load_deployed(out / "deployed.pt")(x.cpu()), net(x.cpu()), rtol=1e-5, atol=1e-5
        )

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        GlobalHydra.instance().clear()
        initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
        cfg = compose(
            "deploy", overrides=[*common, f"output_dir={tmp_path / 'cuda'}", "device=cuda", *FAST]
        )
        report = cli_deploy.run(cfg)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        GlobalHydra.instance().clear()
    assert "TF32 disabled" in report["numerics"] and "cuda" in report["numerics"]
    for errors in report["verification"].values():
        assert errors["float32"] <= TOL32


def test_a_real_batch_of_the_runs_data_is_drawn_without_lightning(tmp_path):
    """deploy.py on a run folder whose saved config names the digits data module: the
    verification batch is drawn from that data, and neither Lightning nor torchmetrics is
    imported on the way (not by the command, the data sets or the plain data classes)."""
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoints" / "model.ckpt", NET_CONFIG)
    data = {"_target_": "repsqueeze.training.datamodules.DigitsDataModule", "batch_size": 16}
    (tmp_path / "run" / ".hydra").mkdir()
    OmegaConf.save({"data": data}, tmp_path / "run" / ".hydra" / "config.yaml")
    out = tmp_path / "out"
    argv = [f"ckpt_path={ckpt}", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    code = (
        "import sys\n"
        "from repsqueeze.cli import deploy\n"
        f"sys.argv = ['deploy.py', *{[*argv, *FAST, 'formats.pt2=false']!r}]\n"
        "deploy.main()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torchmetrics', "
        "'pytorch_lightning'}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "[]"
    report = json.loads((out / "report.json").read_text())
    assert set(report["verification"]) == {"random", "data"}


# --- end to end: train(cfg), then python deploy.py -------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Three epochs of digits through ``train(cfg)``, as ``python train.py`` would run them."""
    run_dir = tmp_path_factory.mktemp("train_run")
    overrides = [f"paths.{key}={run_dir}" for key in ("root_dir", "log_dir", "output_dir")]
    overrides += ["callbacks.progress_bar.refresh_rate=0", "logger=none", "trainer.max_epochs=3"]
    GlobalHydra.instance().clear()
    try:
        initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
        cfg = compose("train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics, objects = train(cfg)
    finally:
        torch.set_num_threads(threads)
    # hydra.main saves the composed config in the run directory; train(cfg) alone does not.
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    datamodule = objects["datamodule"]
    datamodule.setup("test")
    x, y = datamodule.test_set.tensors
    return SimpleNamespace(
        ckpt=run_dir / "checkpoints" / "best.ckpt",
        metrics=metrics,
        net_config=dict(objects["model"].hparams.net_config),
        net=objects["model"].net.cpu().eval(),
        x=x,
        y=y,
    )


@pytest.fixture(scope="module")
def deployed_dir(trained, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("deploy")
    out = tmp / "out"
    result = _run_deploy(tmp, f"ckpt_path={trained.ckpt}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"written to {out}" in result.stdout
    assert not list(tmp.glob(f"{folders.PREFIX}*"))
    return out


@pytest.mark.slow
def test_script_writes_verified_artifacts(trained, deployed_dir):
    assert listing(deployed_dir) == ARTIFACTS
    report = json.loads((deployed_dir / "report.json").read_text())
    check_report(report, {"random", "data"}, ARTIFACTS)  # "data": from the run's .hydra config
    assert report["notes"] == []
    assert report["checkpoint"] == str(trained.ckpt)
    assert report["net_config"] == trained.net_config
    for name in ("deployed.pt", "model.pt2", "model.onnx"):
        assert report["files"][name] == (deployed_dir / name).stat().st_size


@pytest.mark.slow
def test_exported_models_agree_on_the_test_set(trained, deployed_dir):
    """Training form, deployed.pt, torch.export and onnxruntime: same logits, same accuracy."""
    with torch.no_grad():
        logits = {
            "training": trained.net(trained.x),
            "deployed.pt": export.load_deployed(deployed_dir / "deployed.pt")(trained.x),
            "model.pt2": export.load_pt2(deployed_dir / "model.pt2")(trained.x),
        }
    logits["model.onnx"] = export.run_onnx(deployed_dir / "model.onnx", trained.x)
    accuracy = {k: (v.argmax(1) == trained.y).float().mean().item() for k, v in logits.items()}
    for name, value in logits.items():
        torch.testing.assert_close(value, logits["training"], rtol=0, atol=1e-4, msg=name)
    assert len(set(accuracy.values())) == 1, accuracy
    assert accuracy["training"] == pytest.approx(trained.metrics["test/acc"], abs=1e-6)
    assert accuracy["training"] >= 0.9


@pytest.mark.slow
def test_script_with_explicit_data_on_a_bare_checkpoint(trained, tmp_path):
    """A checkpoint copied out of its run (no .hydra/config.yaml): ``data=digits`` gives the
    real batch; without it the input shape cannot be told."""
    ckpt = tmp_path / "best.ckpt"
    shutil.copy(trained.ckpt, ckpt)
    result = _run_deploy(tmp_path, f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'none'}")
    _assert_one_line_error(result, "input_shape")
    no_outputs(tmp_path / "none")

    out = tmp_path / "out"
    result = _run_deploy(tmp_path, f"ckpt_path={ckpt}", f"output_dir={out}", "data=digits")
    assert result.returncode == 0, result.stderr[-3000:]
    check_report(json.loads((out / "report.json").read_text()), {"random", "data"}, ARTIFACTS)
