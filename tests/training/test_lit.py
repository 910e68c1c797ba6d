"""The Lightning module's GPU-facing behaviour, checked on CPU: the deploy check runs with
TF32 and autocast off (whatever the trainer's precision), and ``compile`` routes training
through ``torch.compile`` while checkpoints keep the uncompiled ``state_dict`` keys.
"""

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import repsqueeze as rs
from repsqueeze.core.numerics import strict_fp32
from repsqueeze.training.datamodules import DigitsDataModule
from repsqueeze.training.lit import Classifier

NET = {"name": "digits_net", "block": "repvgg", "num_classes": 10, "in_channels": 1}


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        fast_dev_run=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def _classifier(**kw) -> Classifier:
    optimizer = functools.partial(torch.optim.SGD, lr=0.01)
    return Classifier(NET, optimizer=optimizer, **kw)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_deploy_check_runs_without_tf32_or_autocast(tmp_path, precision):
    """A forward hook on the first block records the math settings while it runs: during
    the test stage both forms (training and deployed) run with cuDNN/matmul TF32 off and
    autocast off; the user's settings are back afterwards."""
    model = _classifier()
    seen: list[tuple[str, bool, bool, bool]] = []

    def record(block: nn.Module, inputs, output) -> None:
        tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
        autocast = torch.is_autocast_enabled("cpu")
        seen.append((stage[0], block.deployed, tf32, autocast))

    first = next(m for m in model.net.modules() if isinstance(m, rs.Squeezable))
    first.register_forward_hook(record)
    stage = ["fit"]
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        trainer = _trainer(tmp_path, precision=precision)
        data = DigitsDataModule(batch_size=16)
        trainer.fit(model, datamodule=data)
        stage[0] = "test"
        (metrics,) = trainer.test(model, datamodule=data, verbose=False)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    fit = [s for s in seen if s[0] == "fit"]
    test = [s for s in seen if s[0] == "test"]
    assert fit and all(tf32 for _, _, tf32, _ in fit)  # training keeps the user's settings
    assert {deployed for _, deployed, _, _ in test} == {False, True}  # both forms ran
    assert all(not tf32 and not autocast for _, _, tf32, autocast in test), test
    if precision == "bf16-mixed":
        assert any(autocast for *_, autocast in fit)  # training itself did run mixed
    assert metrics["test/max_logit_diff"] < 1e-5


def _counting_backend(graphs: list) -> object:
    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    return backend


def test_compile_wraps_the_network_not_its_parameters():
    """``configure_model`` compiles once; the forward goes through the compiled graph."""
    graphs: list[torch.fx.GraphModule] = []
    model = _classifier(compile={"backend": _counting_backend(graphs)}).eval()
    model.configure_model()
    compiled = model.compiled_net
    model.configure_model()
    assert model.compiled_net is compiled and compiled._orig_mod is model.net
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x))
    assert graphs
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_strict_fp32_survives_legacy_flag_changes():
    """A user's legacy ``allow_tf32`` writes between two checks do not leave flags that
    PyTorch later refuses to read (``set_float32_matmul_precision`` inside the helper did)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for value in (True, False, True):
            torch.backends.cuda.matmul.allow_tf32 = value
            with strict_fp32():
                assert not torch.backends.cudnn.allow_tf32
                assert not torch.backends.cuda.matmul.allow_tf32
            assert torch.backends.cuda.matmul.allow_tf32 is value
            torch.get_float32_matmul_precision()  # readable: no mixed-API state
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.slow
def test_compile_routes_training_through_torch_compile(tmp_path):
    """``compile={...}`` passes torch.compile's kwargs; a counting backend shows that the
    training step ran compiled graphs; the checkpoint has the uncompiled keys and loads
    strictly into a fresh, uncompiled Classifier."""
    graphs: list[torch.fx.GraphModule] = []
    model = _classifier(compile={"backend": _counting_backend(graphs)})
    trainer = _trainer(tmp_path)
    data = DigitsDataModule(batch_size=16)
    trainer.fit(model, datamodule=data)
    assert graphs, "torch.compile's backend was never called: the network ran uncompiled"
    assert isinstance(model.compiled_net, torch._dynamo.eval_frame.OptimizedModule)
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    assert metrics["test/max_logit_diff"] < 1e-5

    keys = list(model.state_dict())
    assert keys and not any("_orig_mod" in k or "compiled" in k for k in keys), keys
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    fresh = Classifier(NET)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), model.eval().net(x))


def test_compile_defaults_off():
    model = _classifier()
    model.configure_model()
    assert model.hparams.compile is False and model.compiled_net is None
    assert Classifier(NET, compile=True).hparams.compile is True
