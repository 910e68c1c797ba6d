"""``deploy.py`` in-process (:func:`repsqueeze.cli.deploy.run`): checkpoint in, verified
deployed.pt / model.pt2 / ONNX / report out, and the deploy settings.

The checkpoints are written here from untrained networks with randomized BatchNorm
statistics (see tests/deploy_support.py). ONNX export takes several seconds, so only the
first test writes ``model.onnx``; the others pass ``formats.onnx=false``.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from deploy_support import (
    ARTIFACTS,
    DEPLOYED_ONLY,
    FAST,
    MEASURED,
    NET_CONFIG,
    check_report,
    listing,
    no_outputs,
    write_checkpoint,
)
from omegaconf import OmegaConf
from torch import nn

import repsqueeze as rs
from repsqueeze import checkpoints, export
from repsqueeze import files as folders
from repsqueeze.cli import deploy as cli_deploy
from repsqueeze.cli.errors import SettingError, one_line
from repsqueeze.cli.settings import DEPLOY_MOVED, DEPLOY_SWITCHES, moved_deploy_setting
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
    cfg = compose_deploy(f"ckpt_path={checkpoint}", *DEPLOYED_ONLY)
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
        *DEPLOYED_ONLY,
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


# --- the settings ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("tol_float32=1e-6", "tol_float32=1e-6: not a setting of this command; the setting is "
         "tol.float32 (give tol.float32=1e-6)"),
        ("+tol_onnx=0.1", "tol_onnx=0.1: not a setting of this command; the setting is "
         "tol.onnx (give tol.onnx=0.1)"),
        ("onnx=false", "onnx=false: not a setting of this command; the setting is formats.onnx "
         "(give formats.onnx=false)"),
        ("onnx_opset=17", "the setting is formats.onnx_opset (give formats.onnx_opset=17)"),
        ("latency_min_run_time=1", "the setting is measure.min_run_time"),
        ("int8_calibration_batches=4", "the setting is int8.calibration_batches"),
        ("int8=true", "int8=true: not a setting of this command; the setting is int8.enabled "
         "(give int8.enabled=true)"),
        ("measure=false", "the setting is measure.enabled (give measure.enabled=false)"),
        ("~latency", "latency: not a setting of this command; the setting is measure.latency"),
    ],
)  # fmt: skip
def test_a_flat_name_of_a_grouped_setting_names_its_place(override, expected):
    refusal = moved_deploy_setting(override)
    assert refusal is not None and expected in one_line(refusal), one_line(refusal)


@pytest.mark.parametrize(
    "override", ["tol.float32=1e-6", "int8.enabled=true", "int8={enabled:true}", "seed=3", "-m"]
)
def test_grouped_and_other_settings_pass_the_flat_name_check(override):
    assert moved_deploy_setting(override) is None


def test_every_flat_name_points_to_a_setting_of_deploy_yaml(compose_deploy):
    cfg = compose_deploy()
    for flat, place in DEPLOY_MOVED.items():
        assert OmegaConf.select(cfg, place, default=None) is not None, place
        assert flat not in cfg, flat
    for group, switch in DEPLOY_SWITCHES.items():
        assert OmegaConf.is_dict(cfg[group]) and isinstance(OmegaConf.select(cfg, switch), bool)


def test_the_command_line_refuses_a_flat_name_before_composing(tmp_path):
    """What a user runs: one line naming the setting's place, exit status 1, and nothing
    written (not even Hydra's run folder)."""
    command = [sys.executable, str(ROOT / "deploy.py"), "ckpt_path=x.ckpt", "tol_export=1e-6"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "deploy.py: error: tol_export=1e-6: not a setting of this command; the setting is "
        "tol.export (give tol.export=1e-6)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_group_takes_only_its_own_settings(compose_deploy, checkpoint, tmp_path):
    cfg = compose_deploy(f"ckpt_path={checkpoint}", "+tol.float16=1e-3")
    with pytest.raises(SettingError) as info:
        cli_deploy.run(cfg)
    assert one_line(info.value).startswith(
        "tol.float16=0.001: not a setting of this command; did you mean tol.float64? "
        "settings here: export, float32, float64, onnx"
    )


def test_grouped_settings_reach_the_run(compose_deploy, checkpoint, tmp_path):
    """A tolerance below the float32 error refuses; formats.* picks the files."""
    out = tmp_path / "out"
    common = [f"ckpt_path={checkpoint}", f"output_dir={out}", "input_shape=[1,8,8]", *FAST]
    with pytest.raises(DeployError, match="verification failed.*float32"):
        cli_deploy.run(compose_deploy(*common, "tol.float32=0"))
    no_outputs(out)
    cli_deploy.run(compose_deploy(*common, "formats.pt2=false", "formats.torchscript=true"))
    assert listing(out) == {"deployed.pt", "model.ts", "report.json"}
