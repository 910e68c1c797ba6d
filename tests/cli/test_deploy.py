"""``deploy.py`` in-process (:func:`repsqueeze.cli.deploy.run`): checkpoint in, verified
deployed.pt / model.pt2 / ONNX / report out, and the deploy settings.

The checkpoints are written here from untrained networks with randomized BatchNorm
statistics (see tests/deploy_support.py). ONNX export takes several seconds, so only the
first test writes ``model.onnx``; the others pass ``formats.onnx=false``.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from deploy_support import (
    ARTIFACTS,
    FAST,
    MEASURED,
    NET_CONFIG,
    check_report,
    listing,
    no_outputs,
    write_checkpoint,
)
from torch import nn

import repsqueeze as rs
from repsqueeze import checkpoints, export, folders
from repsqueeze.cli import deploy as cli_deploy
from repsqueeze.models import register_model, registry

ROOT = Path(__file__).resolve().parents[2]
DeployError = cli_deploy.DeployError

# One intra-op thread: several times faster for these tiny models on a busy 2-core machine.
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
]


def deploy_test_plain_cnn(num_classes: int = 10, in_channels: int = 1, deployed: bool = False):
    """What ``rs.contract`` gives back: torch layers only, no re-parameterizable block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


@pytest.fixture
def plain_cnn_registered():
    """``deploy_test_plain_cnn`` in the model registry for one test (other tests check that
    every registered model is one of the library's)."""
    register_model(deploy_test_plain_cnn)
    yield
    registry._MODELS.pop("deploy_test_plain_cnn")


def test_run_with_an_explicit_data_config(compose_deploy, dbb_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={dbb_checkpoint}",
        f"output_dir={out}",
        "data=digits",
        "measure.min_run_time=0.01",
    )
    report = cli_deploy.run(cfg)
    assert listing(out) == ARTIFACTS
    assert not list(tmp_path.glob(f"{folders.PREFIX}*"))
    check_report(report, {"random", "data"}, ARTIFACTS)
    assert report["notes"] == []
    assert report["net_config"] == NET_CONFIG
    assert json.loads((out / "report.json").read_text())["verification"] == report["verification"]
    printed = capsys.readouterr().out
    assert "training form" in printed and f"written to {out}" in printed

    net = checkpoints.load_network(dbb_checkpoint)
    x = torch.randn(7, 1, 8, 8)  # a batch size the exports never saw
    with torch.no_grad():
        expected = net(x)
        outputs = {
            "deployed.pt": export.load_deployed(out / "deployed.pt")(x),
            "model.pt2": export.load_pt2(out / "model.pt2")(x),
        }
    outputs["model.onnx"] = export.run_onnx(out / "model.onnx", x)
    for name, logits in outputs.items():
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4, msg=name)


def test_run_without_data_verifies_on_random_input_only(compose_deploy, checkpoint, tmp_path):
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}", f"output_dir={out}", "input_shape=[1,8,8]", *MEASURED
    )
    report = cli_deploy.run(cfg)
    files = ARTIFACTS - {"model.onnx"}
    check_report(report, {"random"}, files)
    assert listing(out) == files
    for form in ("training", "deployed"):
        for batch in ("latency_b1", "latency_b32"):
            assert report["measurements"][form][batch]["median_ms"] > 0


def test_latency_is_opt_in_and_every_stage_is_timed(compose_deploy, checkpoint, tmp_path, capsys):
    """By default deploy.py counts parameters and MACs, skips latency (and says so), runs on
    one thread, and times each stage in its printout and report."""
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}", f"output_dir={out}", "input_shape=[1,8,8]", "formats.onnx=false"
    )
    torch.set_num_threads(2)  # the single_thread fixture puts 1 back after the test
    report = cli_deploy.run(cfg)
    assert torch.get_num_threads() == 2  # the caller's thread count is put back
    assert set(report["measurements"]["deployed"]) == {"params", "macs_per_sample"}
    assert report["threads"] == 1
    stages = ["output folder", "load", "inputs", "deploy", "verify", "deployed.pt", "model.pt2"]
    timings = report["timings_s"]
    assert list(timings) == [*stages, "measure", "total"]
    assert all(t >= 0 for t in timings.values())
    assert timings["total"] >= sum(timings[k] for k in stages)
    assert json.loads((out / "report.json").read_text())["timings_s"] == timings
    printed = capsys.readouterr().out
    assert "seconds: output folder " in printed
    assert "CPU latency: not measured (measure.latency=true measures it)" in printed


def test_run_default_output_dir_is_beside_the_run(compose_deploy, checkpoint):
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}", "input_shape=[1,8,8]", "formats.pt2=false", *FAST
    )
    report = cli_deploy.run(cfg)
    out = checkpoint.parent.parent / "deployed"
    assert report["output_dir"] == str(out)
    assert listing(out) == {"deployed.pt", "report.json"}
    shutil.rmtree(out)  # the checkpoint fixture is shared


def test_torchscript_only_when_asked(compose_deploy, checkpoint, tmp_path):
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}",
        f"output_dir={out}",
        "input_shape=[1,8,8]",
        "formats.pt2=false",
        "formats.torchscript=true",
        *FAST,
    )
    report = cli_deploy.run(cfg)
    assert listing(out) == {"deployed.pt", "model.ts", "report.json"}
    assert report["checks"]["model.ts"]["relative_diff"] <= 1e-5
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.jit.load(str(out / "model.ts"))(x),
            export.load_deployed(out / "deployed.pt")(x),
            rtol=0,
            atol=1e-5,
        )


def test_a_missing_checkpoint_makes_no_folder(compose_deploy, tmp_path):
    """The default output folder is beside the checkpoint's run: a typo creates nothing."""
    cfg = compose_deploy(f"ckpt_path={tmp_path / 'typo' / 'checkpoints' / 'best.ckpt'}")
    with pytest.raises(DeployError, match="checkpoint not found"):
        cli_deploy.run(cfg)
    assert list(tmp_path.iterdir()) == []


def test_run_needs_an_input_shape(compose_deploy, checkpoint, tmp_path):
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}", *FAST)
    with pytest.raises(DeployError, match="input_shape"):
        cli_deploy.run(cfg)
    no_outputs(tmp_path / "out")


def test_failed_verification_writes_nothing(compose_deploy, checkpoint, tmp_path, monkeypatch):
    def tampering_deploy(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
        deployed = rs.deploy(model, inplace=inplace)
        with torch.no_grad():
            next(deployed.parameters()).view(-1)[0] += 0.1
        return deployed

    monkeypatch.setattr(cli_deploy, "deploy", tampering_deploy)
    out = tmp_path / "out"
    cfg = compose_deploy(f"ckpt_path={checkpoint}", f"output_dir={out}", "data=digits", *FAST)
    with pytest.raises(DeployError, match="verification failed.*in float32"):
        cli_deploy.run(cfg)
    no_outputs(out)


def test_verification_runs_with_tf32_off(compose_deploy, checkpoint, tmp_path, monkeypatch):
    """TF32 switched on globally (as cuDNN does on Ampere+) is off while the forms are
    compared, back on afterwards, and the report says how float32 ran."""
    seen = []
    verify = export.verify

    def spy(*args, **kwargs):
        seen.append(torch.backends.cudnn.allow_tf32)
        return verify(*args, **kwargs)

    monkeypatch.setattr(export, "verify", spy)
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}",
        f"output_dir={tmp_path / 'out'}",
        "input_shape=[1,8,8]",
        "formats.pt2=false",
        *FAST,
    )
    # cuDNN's flag only: flipping torch.backends.cuda.matmul.allow_tf32 (the legacy API)
    # leaves torch.get_float32_matmul_precision() raising for the rest of the process
    flag = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        report = cli_deploy.run(cfg)
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = flag
    assert seen == [False]
    expected = "CPU: no TF32" if not torch.cuda.is_available() else "TF32 disabled"
    assert expected in report["numerics"]


# --- bad checkpoints -------------------------------------------------------------------------
def _set(key: str, value: float, index: int = 0):
    def edit(state: dict) -> None:
        state[key].view(-1)[index] = value

    return edit


BROKEN_WEIGHTS = {
    "nan_weight": (
        _set("net.stem.0.branches.0.0.weight", float("nan")),
        "stem.0.branches.0.0.weight holds 1 NaN/Inf",
    ),
    "inf_bias": (_set("net.head.bias", float("inf"), 3), "head.bias holds 1 NaN/Inf"),
    "negative_running_var": (
        _set("net.stages.1.0.0.branches.1.1.running_var", -0.5),
        "stages.1.0.0.branches.1.1.running_var has negative entries",
    ),
}


@pytest.mark.parametrize("kind", BROKEN_WEIGHTS)
def test_broken_weights_are_refused(compose_deploy, tmp_path, kind):
    edit, message = BROKEN_WEIGHTS[kind]
    ckpt = write_checkpoint(tmp_path / "broken.ckpt", NET_CONFIG, edit=edit)
    cfg = compose_deploy(f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'out'}", *FAST)
    with pytest.raises(DeployError, match=message.replace(".", r"\.")):
        cli_deploy.run(cfg)
    no_outputs(tmp_path / "out")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ("[3,8,8]", r"input_shape \[3, 8, 8\] does not fit the network: .*channels"),
        ("[1,0,8]", "give \\[C,H,W\\] as positive integers"),
        ("seven", "give \\[C,H,W\\] as positive integers"),
    ],
)
def test_wrong_input_shape(compose_deploy, checkpoint, tmp_path, shape, message):
    cfg = compose_deploy(
        f"ckpt_path={checkpoint}", f"output_dir={tmp_path / 'out'}", f"input_shape={shape}", *FAST
    )
    with pytest.raises(DeployError, match=message):
        cli_deploy.run(cfg)
    no_outputs(tmp_path / "out")


def test_a_network_without_blocks_deploys_as_is(compose_deploy, tmp_path, plain_cnn_registered):
    """What ``rs.contract`` returns (torch layers only): nothing to squeeze, still verified
    and exported."""
    config = {"name": "deploy_test_plain_cnn", "num_classes": 4, "in_channels": 1}
    ckpt = write_checkpoint(tmp_path / "plain.ckpt", config)
    out = tmp_path / "out"
    cfg = compose_deploy(
        f"ckpt_path={ckpt}", f"output_dir={out}", "input_shape=[1,8,8]", "use_data=false", *MEASURED
    )
    report = cli_deploy.run(cfg)
    assert report["notes"] == ["nothing to squeeze: the network has no re-parameterizable block"]
    assert report["verification"]["random"]["float64"] == 0
    assert listing(out) == {"deployed.pt", "model.pt2", "report.json"}
    m = report["measurements"]
    assert (
        m["deployed"]["macs_per_sample"] == m["training"]["macs_per_sample"] == 8 * 9 * 64 + 8 * 4
    )
