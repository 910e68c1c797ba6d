"""INT8 deployment: the QARepVGG block, weight-range statistics, cross-layer equalization,
onnxruntime static quantization (repsqueeze.quant) and ``deploy.py int8=true``.

Oracles: QARepVGG against its formula written out with ``F.conv2d`` / ``F.batch_norm``;
equalization against the model before it (float64); quantization against the float ONNX
model's accuracy on labels it defines itself.
"""

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_equivalent, randomize, randomize_bn
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from torch import nn

import repsqueeze as rs
from benchmarks import int8 as int8_bench
from repsqueeze import quant
from repsqueeze.cli import deploy as deploy_cli
from repsqueeze.core.auto import pick_mode
from repsqueeze.training.lit import Classifier
from repsqueeze.zoo import QARepVGGBlock, make_block

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- QARepVGG --------------------------------------------------------------------------------
def qarepvgg_oracle(block: QARepVGGBlock, x: torch.Tensor) -> torch.Tensor:
    """``bn(bn3(conv3(x)) + conv1(x) [+ x])``, every layer run the ordinary way (eval)."""
    parallel, bn = block.layers
    (conv3, bn3), conv1, *identity = parallel.branches

    def norm(m: nn.BatchNorm2d, y: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, False, 0, m.eps)

    y = norm(bn3, F.conv2d(x, conv3.weight, None, conv3.stride, conv3.padding, 1, conv3.groups))
    y = y + F.conv2d(x, conv1.weight, conv1.bias, conv1.stride, 0, 1, conv1.groups)
    if identity:
        y = y + x
    return norm(bn, y)


@pytest.mark.parametrize(
    ("c_in", "c_out", "stride", "groups", "bias_1x1"),
    [(4, 4, 1, 1, False), (4, 6, 1, 1, False), (4, 4, 2, 1, False), (4, 4, 1, 2, True)],
)
def test_qarepvgg_structure_follows_the_paper(c_in, c_out, stride, groups, bias_1x1):
    block = QARepVGGBlock(c_in, c_out, stride=stride, groups=groups, bias_1x1=bias_1x1)
    parallel, trailing = block.layers
    assert isinstance(parallel, rs.Parallel) and isinstance(trailing, nn.BatchNorm2d)
    main, one, *identity = parallel.branches
    assert [type(m) for m in main] == [nn.Conv2d, nn.BatchNorm2d]  # the k x k keeps its BN
    assert main[0].kernel_size == (3, 3) and main[0].bias is None
    assert isinstance(one, nn.Conv2d) and one.kernel_size == (1, 1)  # no BN on the 1x1
    assert (one.bias is not None) == bias_1x1
    has_identity = c_in == c_out and stride == 1
    assert [type(m) for m in identity] == ([nn.Identity] if has_identity else [])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in block.modules()) == 2


@pytest.mark.parametrize(
    ("c_in", "c_out", "stride", "groups", "bias_1x1"),
    [(4, 4, 1, 1, False), (4, 6, 1, 1, True), (4, 4, 2, 2, False), (4, 4, 1, 4, True)],
)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_qarepvgg_squeezes_exactly_against_its_formula(
    c_in, c_out, stride, groups, bias_1x1, dtype, tol
):
    block = QARepVGGBlock(c_in, c_out, stride=stride, groups=groups, bias_1x1=bias_1x1)
    block = randomize(block.to(dtype), _gen(1)).eval()
    x = torch.randn(3, c_in, 9, 8, generator=_gen(2)).to(dtype)
    with torch.no_grad():
        expected = qarepvgg_oracle(block, x)
        assert_equivalent(block(x), expected, tol)
        assert_equivalent(block.squeeze()(x), expected, tol)
        assert_equivalent(rs.deploy(block)(x), expected, tol)


def test_qarepvgg_model_from_the_registry_round_trips_a_strict_state_dict():
    model = randomize(rs.create_model("digits_net", block="qarepvgg").double(), _gen(3)).eval()
    x = torch.randn(5, 1, 8, 8, generator=_gen(4), dtype=torch.float64)
    deployed = rs.deploy(model)
    assert all(b.deployed for b in deployed.modules() if isinstance(b, rs.Squeezable))
    built = rs.create_model("digits_net", block="qarepvgg", deployed=True).double()
    built.load_state_dict(deployed.state_dict(), strict=True)
    with torch.no_grad():
        assert_equivalent(built(x), model(x), 1e-10)


def test_qarepvgg_online_in_training_needs_online_norm():
    """The k x k branch keeps its BN (as in the paper): with batch statistics it cannot be
    folded in the forward pass, so plain online mode refuses it, naming the layer."""
    block = make_block("qarepvgg", 4, 4, mode="online").train()
    with pytest.raises(ValueError, match=r"layers\.0\.branches\.0\.1 .*online_norm=True"):
        block(torch.randn(2, 4, 6, 6))


def test_qarepvgg_online_in_eval_equals_chain():
    block = randomize(make_block("qarepvgg", 4, 4).double(), _gen(5)).eval()
    x = torch.randn(2, 4, 7, 7, generator=_gen(6), dtype=torch.float64)
    with torch.no_grad():
        chain = block(x)
        assert_equivalent(block.set_mode("online")(x), chain, 1e-10)


def test_qarepvgg_online_norm_trains_online_like_chain():
    """With online_norm=True the inner BNs become channel scales: the training forward and
    its gradients are the chain's, composed into one convolution."""
    x = torch.randn(4, 4, 7, 7, generator=_gen(7), dtype=torch.float64)
    results = []
    for mode in ("chain", "online"):
        torch.manual_seed(0)
        block = make_block("qarepvgg", 4, 4, online_norm=True, mode=mode).double().train()
        y = block(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        results.append((y.detach(), [p.grad for p in block.parameters()]))
    (y_chain, g_chain), (y_online, g_online) = results
    assert_equivalent(y_online, y_chain, 1e-10)
    for a, b in zip(g_online, g_chain, strict=True):
        assert_equivalent(a, b, 1e-10)


def test_qarepvgg_auto_in_training_falls_back_to_chain():
    block = make_block("qarepvgg", 16, 16, mode="auto").train()
    x = torch.randn(8, 16, 16, 16)
    assert pick_mode(block, x, 2) == "chain"
    block(x)  # no error


def test_expand_refuses_qarepvgg():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    with pytest.raises(ValueError, match="qarepvgg.*identity branch has no BatchNorm"):
        rs.expand(model, block="qarepvgg")


# --- weight ranges ---------------------------------------------------------------------------
def test_range_ratio_of_a_conv_with_an_outlier_channel():
    conv = nn.Conv2d(3, 5, 3)
    with torch.no_grad():
        conv.weight.uniform_(-0.5, 0.5)
        for c in range(5):  # channel maxima 1, 1, 2, 1, 10 (one tap each)
            conv.weight[c, 0, 1, 1] = [1.0, -1.0, 2.0, 1.0, -10.0][c]
    assert quant.channel_ranges(conv.weight).tolist() == [1, 1, 2, 1, 10]
    assert quant.range_ratio(conv.weight) == pytest.approx(10.0)  # max 10 / median 1
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU(), conv)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1))
    rows = quant.weight_ranges(model)
    assert [r["layer"] for r in rows] == ["0", "2"]
    assert rows[0]["range_ratio"] == pytest.approx(1.5) and rows[0]["max_abs"] == 3
    assert rows[1]["median_channel_max"] == 1 and rows[1]["out_channels"] == 5
    assert [r["layer"] for r in quant.worst_layers(rows, 1)] == ["2"]
    assert quant.range_ratio(torch.zeros(4, 2, 3, 3)) == 1.0


# --- cross-layer equalization ----------------------------------------------------------------
class Residual(nn.Module):
    """conv -> ReLU whose output is used twice: not a pair (the add sees the unscaled path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = (
            nn.Conv2d(6, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 6, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        return self.conv2(y) + y


def outlier_net(scale: float = 100.0) -> nn.Sequential:
    """conv -> ReLU -> grouped conv -> ReLU -> conv -> pool -> linear, float64, with output
    channel 1 of the first conv scaled up by ``scale`` and its consumers scaled down: the
    same function as without, but one activation and one weight channel far out of range."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the linear head's default initialisation
        net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(8, 6, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),
        )  # fmt: skip
    net = randomize(net.double(), _gen(8)).eval()
    with torch.no_grad():  # centre and standardise the logits: labels spread over all classes
        logits = net(torch.randn(512, 1, 8, 8, generator=_gen(16), dtype=torch.float64))
        net[-1].weight /= logits.std(0)[:, None]
        net[-1].bias.sub_(logits.mean(0)).div_(logits.std(0))
        net[0].weight[1] *= scale
        net[0].bias[1] *= scale
        net[2].weight[:4, 1] /= scale  # group 0 reads input channel 1 at local index 1
    return net.eval()


class Untraceable(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if x.sum() > 0 else x  # control flow on a tensor value


def test_relu_conv_pairs_finds_only_exact_pairs():
    assert quant.relu_conv_pairs(outlier_net()) == [("0", "2"), ("2", "4")]
    assert quant.relu_conv_pairs(Residual()) == []
    with pytest.raises(ValueError, match="Untraceable cannot be traced with torch.fx"):
        quant.equalize(Untraceable(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1)))
    deployed = rs.deploy(rs.create_model("digits_net", block="repvgg"))
    assert quant.relu_conv_pairs(deployed) == [
        ("stem.0.conv", "stages.0.0.0.conv"),
        ("stages.0.0.0.conv", "stages.1.0.0.conv"),
        ("stages.1.0.0.conv", "stages.1.1.0.conv"),
    ]


def test_equalize_preserves_the_function_and_shrinks_range_ratios():
    net = outlier_net()
    x = torch.randn(6, 1, 8, 8, generator=_gen(9), dtype=torch.float64)
    equalized, pairs = quant.equalize(net)
    assert pairs == [("0", "2"), ("2", "4")]
    with torch.no_grad():
        assert_equivalent(equalized(x), net(x), 1e-10)
    before, after = quant.weight_ranges(net), quant.weight_ranges(equalized)
    assert before[0]["range_ratio"] > 50
    assert after[0]["range_ratio"] < 3
    assert max(r["range_ratio"] for r in after) < max(r["range_ratio"] for r in before) / 10
    # the defining property at convergence: both sides of every pair have equal ranges
    for first, second in pairs:
        r1 = quant.channel_ranges(equalized.get_submodule(first).weight)
        conv2 = equalized.get_submodule(second)
        torch.testing.assert_close(r1, quant.input_ranges(conv2, conv2.weight), rtol=1e-6, atol=0)
    assert torch.equal(net[0].weight, outlier_net()[0].weight)  # the input is not modified


def test_equalize_a_deployed_model_exactly():
    model = randomize(rs.create_model("digits_net", block="qarepvgg").double(), _gen(10))
    deployed = rs.deploy(model.eval())
    x = torch.randn(4, 1, 8, 8, generator=_gen(11), dtype=torch.float64)
    equalized, pairs = quant.equalize(deployed)
    assert len(pairs) == 3
    with torch.no_grad():
        assert_equivalent(equalized(x), deployed(x), 1e-10)


# --- static quantization in onnxruntime ------------------------------------------------------
def _labelled(net: nn.Module, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches labelled by the float model itself: float accuracy is 1 by construction."""
    x = torch.randn(n, 1, 8, 8, generator=_gen(seed))
    with torch.no_grad():
        y = net.float()(x).argmax(1)
    return list(zip(x.split(32), y.split(32), strict=True))


def test_quantize_refuses_an_outlier_model_and_equalization_rescues_it(tmp_path):
    net = outlier_net(scale=1000.0).float()
    test = _labelled(net, 256, 12)
    calibration = [x for x, _ in _labelled(net, 128, 13)]
    path = tmp_path / "model.int8.onnx"
    with pytest.raises(quant.QuantizationError, match=r"^INT8 accuracy drop 0\.\d+ above int8\.max_drop=0\.1 .*not written"):  # fmt: skip
        quant.quantize(net, calibration, test, path, max_drop=0.1, latency_repeats=1)
    assert not path.exists() and list(tmp_path.iterdir()) == []

    report = quant.quantize(net, calibration, test, path, max_drop=0.1, cle=True, latency_repeats=1)
    assert path.is_file() and report["int8_bytes"] == path.stat().st_size
    assert report["acc_float"] == 1.0
    assert report["int8_acc_drop"] == pytest.approx(1.0 - report["acc_int8"])
    assert report["int8_acc_drop"] <= 0.1
    assert report["int8_cle_pairs"] == [["0", "2"], ["2", "4"]]
    first = report["int8_weight_ranges"][0]
    assert first["range_ratio"] > 50 and first["range_ratio_cle"] < 3
    assert set(report["int8_latency_ms"]) == {"float_b1", "int8_b1", "float_b32", "int8_b32"}
    assert all(v > 0 for v in report["int8_latency_ms"].values())
    assert report["int8_calibration_batches"] == 4 and report["int8_test_samples"] == 256
    # the written file is an INT8 QDQ model that onnxruntime runs close to the float model
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    x = test[0][0]
    with torch.no_grad():
        ref = net(x)
    assert (rs.export.run_onnx(path, x) - ref).abs().max() <= 0.1 * ref.abs().max()


def test_quantize_refuses_bad_arguments(tmp_path):
    net = outlier_net().float()
    test = _labelled(net, 8, 14)
    with pytest.raises(ValueError, match="max_drop must be >= 0"):
        quant.quantize(net, [test[0][0]], test, tmp_path / "m.onnx", max_drop=-0.1)
    with pytest.raises(ValueError, match="no calibration batches"):
        quant.quantize(net, [], test, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="calibration method must be one of"):
        quant.quantize(net, [test[0][0]], test, tmp_path / "m.onnx", method="mse")
    # a short last batch (as a DataLoader gives) with a histogram calibration
    calibration = [test[0][0], test[0][0][:3]]
    report = quant.quantize(net, calibration, test, tmp_path / "p.onnx", max_drop=1.0,
                            method="percentile", latency_repeats=1)  # fmt: skip
    assert report["int8_calibration_batches"] == 2 and (tmp_path / "p.onnx").is_file()
    (tmp_path / "p.onnx").unlink()
    with pytest.raises(ValueError, match="no test batches"):
        quant.quantize(net, [test[0][0]], [], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# --- deploy.py int8=true ---------------------------------------------------------------------
@pytest.fixture
def deploy_cfg(tmp_path):
    """``deploy_cfg(*overrides)``: the deploy config for a qarepvgg digits checkpoint (untrained,
    BN statistics randomized), writing only under ``tmp_path``."""
    model = Classifier({"name": "digits_net", "block": "qarepvgg", "num_classes": 10})
    randomize_bn(model.net, _gen(15))
    ckpt = tmp_path / "run" / "checkpoints" / "model.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, ckpt)
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3")
    paths = [f"paths.{key}={tmp_path}" for key in ("root_dir", "log_dir", "output_dir")]
    base = [*paths, f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'out'}", "data=digits"]
    yield lambda *overrides: compose(
        "deploy", overrides=[*base, "measure.enabled=false", *overrides]
    )
    GlobalHydra.instance().clear()


def test_deploy_int8_writes_a_verified_int8_model(deploy_cfg, tmp_path, capsys):
    report = deploy_cli.run(deploy_cfg("int8.enabled=true", "int8.max_drop=1.0", "int8.cle=true"))
    out = tmp_path / "out"
    assert (out / "model.int8.onnx").is_file() and (out / "model.onnx").is_file()
    assert report["files"]["model.int8.onnx"] == (out / "model.int8.onnx").stat().st_size
    assert 0 <= report["acc_int8"] <= 1 and 0 <= report["acc_float"] <= 1
    assert report["int8_acc_drop"] == pytest.approx(report["acc_float"] - report["acc_int8"])
    assert report["int8_test_samples"] == 359  # the digits test split
    assert report["int8_calibration_batches"] == 8
    assert len(report["int8_weight_ranges"]) == 4 and len(report["int8_cle_pairs"]) == 3
    assert "weight range ratio" in capsys.readouterr().out


def test_deploy_int8_refusal_is_one_line_and_writes_nothing(deploy_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(
        quant.pipeline, "onnx_accuracy", lambda *_: ({"float": 0.9, "int8": 0.5}, 359)
    )
    with pytest.raises(deploy_cli.DeployError) as err:
        deploy_cli.run(deploy_cfg("int8.enabled=true"))
    message = str(err.value)
    assert message.startswith("INT8 accuracy drop 0.4000 above int8.max_drop=0.02")
    assert "\n" not in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not list(tmp_path.glob(".deploy-*"))


@pytest.mark.slow
def test_quantize_a_trained_digits_net_keeps_its_accuracy(tmp_path):
    """A digits net trained for two epochs: INT8 (per-channel, MinMax) within 3 points."""
    from repsqueeze.training.datamodules import DigitsDataModule

    data = DigitsDataModule(batch_size=64)
    data.setup()
    torch.manual_seed(0)
    model = rs.create_model("digits_net", block="qarepvgg")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(2):
        for x, y in data.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    deployed = rs.deploy(model.eval())
    calibration = itertools.islice(data.train_dataloader(), 4)
    report = quant.quantize(
        deployed, calibration, data.test_dataloader(), tmp_path / "m.onnx", max_drop=0.03,
        latency_repeats=1,
    )  # fmt: skip
    with torch.no_grad():
        hits = sum(int((deployed(x).argmax(1) == y).sum()) for x, y in data.test_dataloader())
    assert report["acc_float"] == pytest.approx(hits / 359, abs=1 / 359)  # ORT float == torch
    assert report["acc_float"] > 0.85


# --- the benchmark ---------------------------------------------------------------------------
def _check_rows(rows: list[dict]) -> None:
    for row in rows:
        for key in ("float acc", "INT8 acc", "INT8 acc (CLE)"):
            assert 0 <= row[key] <= 1, row
        assert row["drop"] == pytest.approx(row["float acc"] - row["INT8 acc"])
        assert row["drop (CLE)"] == pytest.approx(row["float acc"] - row["INT8 acc (CLE)"])
        assert row["worst range ratio"] >= 1 and row["worst range ratio (CLE)"] >= 1


def test_committed_int8_results_cover_every_block_kind():
    """benchmarks/results_int8.json is the measured INT8 table (benchmarks/results_int8.md,
    linked from docs/int8.md): it must not go stale when a block kind is added."""
    import json

    results = json.loads((ROOT / "benchmarks" / "results_int8.json").read_text())
    assert results["environment"]["quick"] is False
    assert [r["block"] for r in results["digits"]] == list(rs.BLOCKS)
    _check_rows(results["digits"] + results["cifar10"])
    assert set(results["latency_ms"]) == {"float_b1", "int8_b1", "float_b32", "int8_b32"}


@pytest.mark.slow
def test_benchmark_quick_run(tmp_path):
    results = int8_bench.main(["--quick", "--out", str(tmp_path / "r")])
    assert [r["block"] for r in results["digits"]] == list(rs.BLOCKS)[:2]
    _check_rows(results["digits"])
    assert (tmp_path / "r.md").read_text().count("| digits |") == 2
