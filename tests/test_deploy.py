"""``deploy.py``: checkpoint in, verified deployed.pt / TorchScript / ONNX / report out.

Fast tests call ``deploy.run(cfg)`` in-process on a checkpoint written here from an untrained
network with randomized BatchNorm statistics. The ``slow`` ones train digits for a few epochs
with ``train(cfg)`` and run ``python deploy.py`` in a subprocess, as a user would.
"""

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import randomize_bn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

import repsqueeze as rs
from repsqueeze import export
from repsqueeze.lit import Classifier

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = {"deployed.pt", "model.ts", "model.onnx", "report.json"}
NET_CONFIG = {"name": "digits_net", "block": "dbb", "num_classes": 10, "in_channels": 1}
TOL64, TOL32 = 1e-10, 1e-5

# One intra-op thread: several times faster for these tiny models on a busy 2-core machine.
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


deploy_script = _load_script("deploy")
train = _load_script("train").train
DeployError = deploy_script.DeployError

Compose = Callable[..., DictConfig]


class CreatesMarker:
    """Pickles to ``open(marker, "w")``: unpickling it with code execution creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _no_outputs(out_dir: Path) -> None:
    """Nothing in the output folder and no staging folder left beside it."""
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert not list(out_dir.parent.glob(".deploy-*"))


def _check_report(report: dict, inputs: set[str]) -> None:
    assert set(report["verification"]) == inputs
    for errors in report["verification"].values():
        assert 0 <= errors["float64"] <= TOL64
        assert 0 <= errors["float32"] <= TOL32
    assert report["reload_max_abs_diff"] == 0
    assert report["torchscript_max_abs_diff"] <= 1e-5
    assert report["onnx_relative_diff"] <= 1e-4
    m = report["measurements"]
    assert m["deployed"]["params"] < m["training"]["params"]
    assert m["deployed"]["macs_per_sample"] < m["training"]["macs_per_sample"]


# --- in-process: deploy.run(cfg) -----------------------------------------------------------
@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A Lightning-style checkpoint of an untrained dbb digits net, BN stats randomized."""
    model = Classifier(NET_CONFIG)
    randomize_bn(model.net, torch.Generator().manual_seed(0))
    path = tmp_path / "run" / "checkpoints" / "model.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


@pytest.fixture
def compose_deploy(tmp_path: Path) -> Iterator[Compose]:
    """``compose_deploy(*overrides)``: the deploy config, writing only under ``tmp_path``."""
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
    paths = [f"paths.{key}={tmp_path}" for key in ("root_dir", "log_dir", "output_dir")]
    yield lambda *overrides: compose("deploy", overrides=[*paths, "latency_repeats=2", *overrides])
    GlobalHydra.instance().clear()


def test_run_with_an_explicit_data_config(compose_deploy, checkpoint, tmp_path):
    out = tmp_path / "out"
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}", "data=digits")
    report = deploy_script.run(cfg)
    assert {p.name for p in out.iterdir()} == ARTIFACTS
    assert not list(tmp_path.glob(".deploy-*"))
    _check_report(report, {"random", "data"})
    assert report["notes"] == []
    assert report["net_config"] == NET_CONFIG
    assert json.loads((out / "report.json").read_text())["verification"] == report["verification"]

    net, _ = deploy_script.load_checkpoint(checkpoint)
    x = torch.randn(7, 1, 8, 8)  # a batch size the exports never saw
    with torch.no_grad():
        expected = net(x)
        outputs = {
            "deployed.pt": export.load_deployed(out / "deployed.pt")(x),
            "model.ts": torch.jit.load(str(out / "model.ts"))(x),
        }
    outputs["model.onnx"] = export.run_onnx(out / "model.onnx", x)
    for name, logits in outputs.items():
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4, msg=name)


def test_run_without_data_verifies_on_random_input_only(compose_deploy, checkpoint, tmp_path):
    out = tmp_path / "out"
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}", "input_shape=[1,8,8]")
    report = deploy_script.run(cfg)
    _check_report(report, {"random"})
    assert {p.name for p in out.iterdir()} == ARTIFACTS


def test_run_default_output_dir_is_beside_the_run(compose_deploy, checkpoint):
    cfg = compose_deploy(f"ckpt_path={checkpoint}", "input_shape=[1,8,8]", "onnx=false")
    report = deploy_script.run(cfg)
    out = checkpoint.parent.parent / "deployed"
    assert report["output_dir"] == str(out)
    assert {p.name for p in out.iterdir()} == {"deployed.pt", "model.ts", "report.json"}


def test_run_needs_an_input_shape(compose_deploy, checkpoint, tmp_path):
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}")
    with pytest.raises(DeployError, match="input_shape"):
        deploy_script.run(cfg)
    _no_outputs(tmp_path / "out")


def test_failed_verification_writes_nothing(compose_deploy, checkpoint, tmp_path, monkeypatch):
    def tampering_deploy(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
        deployed = rs.deploy(model, inplace=inplace)
        with torch.no_grad():
            next(deployed.parameters()).view(-1)[0] += 0.1
        return deployed

    monkeypatch.setattr(deploy_script, "deploy", tampering_deploy)
    out = tmp_path / "out"
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}", "data=digits")
    with pytest.raises(DeployError, match="verification failed.*in float32"):
        deploy_script.run(cfg)
    _no_outputs(out)


def test_failed_onnx_check_writes_nothing(compose_deploy, checkpoint, tmp_path):
    """The ONNX check comes after deployed.pt and model.ts exist: none of them is moved in."""
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}", f"output_dir={out}", "input_shape=[1,8,8]", "tol_onnx=-1"
    )
    with pytest.raises(DeployError, match="onnxruntime output differs"):
        deploy_script.run(cfg)
    _no_outputs(out)


def _bad_file(kind: str, folder: Path) -> Path:
    """A file ``deploy.py`` must refuse; ``folder / "MARKER"`` appears if pickled code ran."""
    path = folder / f"{kind}.ckpt"
    marker = folder / "MARKER"
    if kind == "random_bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "pickled_object":  # a checkpoint-looking file carrying code
        torch.save({"state_dict": {}, "hyper_parameters": CreatesMarker(marker)}, path)
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps(CreatesMarker(marker)))
    elif kind == "no_net_config":
        torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, path)
    elif kind != "missing":
        raise ValueError(kind)
    return path


BAD_FILES = {
    "missing": "checkpoint not found",
    "random_bytes": "cannot be loaded safely",
    "tensor": "not a Lightning checkpoint",
    "pickled_object": "cannot be loaded safely",
    "plain_pickle": "cannot be loaded safely",
    "no_net_config": "no net_config",
}


def test_the_marker_is_a_real_probe(tmp_path):
    """Control: unpickling ``CreatesMarker`` with code execution does create the marker."""
    path = _bad_file("pickled_object", tmp_path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("kind", BAD_FILES)
def test_load_checkpoint_refuses(tmp_path, kind):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(DeployError, match=BAD_FILES[kind] or None) as info:
        deploy_script.load_checkpoint(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    "checkpoint_dict",
    [
        {"state_dict": {}, "hyper_parameters": {"net_config": {"name": "no_such_net"}}},
        {"state_dict": {}, "hyper_parameters": {"net_config": {"name": "digits_net", "blok": 1}}},
        {"state_dict": {}, "hyper_parameters": ["not", "a", "dict"]},
        {"state_dict": ["not", "a", "dict"], "hyper_parameters": {"net_config": NET_CONFIG}},
    ],
    ids=["unknown_model", "unknown_argument", "hparams_not_a_dict", "state_dict_not_a_dict"],
)
def test_malformed_checkpoint_is_a_deploy_error(tmp_path, checkpoint_dict):
    """Bug: these raise ValueError/TypeError/AttributeError, so ``python deploy.py`` prints a
    traceback instead of a one-line ``deploy.py: error:``."""
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint_dict, path)
    with pytest.raises(DeployError, match=str(path)):
        deploy_script.load_checkpoint(path)


def test_refusal_message_is_plain_text(tmp_path):
    """Bug: torch's weights-only message carries ANSI bold escapes (``\\x1b[1m``) and is cut
    after "you have two options," without the options; the one-line error repeats both."""
    path = _bad_file("pickled_object", tmp_path)
    with pytest.raises(DeployError) as info:
        deploy_script.load_checkpoint(path)
    assert "\x1b" not in str(info.value)


# --- subprocess: python deploy.py ----------------------------------------------------------
def _run_deploy(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python deploy.py`` from the repository root; Hydra's own files go to tmp_path."""
    command = [
        sys.executable,
        str(ROOT / "deploy.py"),
        f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "latency_repeats=2",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"
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
    result = _run_deploy(tmp_path, f"ckpt_path={_bad_file(kind, inputs)}", f"output_dir={out}")
    _assert_one_line_error(result, BAD_FILES[kind])
    assert not (inputs / "MARKER").exists()
    _no_outputs(out)
    assert "written to" not in result.stdout


def test_script_without_ckpt_path_is_a_one_line_error(tmp_path):
    """Bug: ``cfg.ckpt_path`` is ``???``; omegaconf's MissingMandatoryValue escapes ``main``
    and Hydra prints a traceback."""
    result = _run_deploy(tmp_path, f"output_dir={tmp_path / 'out'}")
    _assert_one_line_error(result, "ckpt_path")


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
    assert not list(tmp.glob(".deploy-*"))
    return out


@pytest.mark.slow
def test_script_writes_verified_artifacts(trained, deployed_dir):
    assert {p.name for p in deployed_dir.iterdir()} == ARTIFACTS
    report = json.loads((deployed_dir / "report.json").read_text())
    _check_report(report, {"random", "data"})  # "data": found through the run's .hydra config
    assert report["notes"] == []
    assert report["checkpoint"] == str(trained.ckpt)
    assert report["net_config"] == trained.net_config
    for name in ("deployed.pt", "model.ts", "model.onnx"):
        assert report["files"][name] == (deployed_dir / name).stat().st_size


@pytest.mark.slow
def test_exported_models_agree_on_the_test_set(trained, deployed_dir):
    """Training form, deployed.pt, TorchScript and onnxruntime: same logits, same accuracy."""
    with torch.no_grad():
        logits = {
            "training": trained.net(trained.x),
            "deployed.pt": export.load_deployed(deployed_dir / "deployed.pt")(trained.x),
            "model.ts": torch.jit.load(str(deployed_dir / "model.ts"))(trained.x),
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
    _no_outputs(tmp_path / "none")

    out = tmp_path / "out"
    result = _run_deploy(tmp_path, f"ckpt_path={ckpt}", f"output_dir={out}", "data=digits")
    assert result.returncode == 0, result.stderr[-3000:]
    _check_report(json.loads((out / "report.json").read_text()), {"random", "data"})
