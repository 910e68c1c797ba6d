"""The training-recipe knobs: per-step warmup schedules, weight-decay rules and the RepVGG /
DBB regularisers, soft targets, transforms.v2 augmentation and MixUp / CutMix, EMA (validated,
checkpointed, tested and deployed), the learning-rate monitor, FLOPs in the model summary,
channels_last + bf16-mixed + compile together, and loggers behind extras.
"""

import functools
import importlib.util
import logging
import math

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn
from training_support import image_folder

import repsqueeze.training.loggers
from repsqueeze.cli import deploy as deploy_cli
from repsqueeze.cli.errors import one_line
from repsqueeze.cli.train import train
from repsqueeze.models import create_model
from repsqueeze.surgery import deploy
from repsqueeze.training.datamodules import DigitsDataModule, ImageFolderDataModule
from repsqueeze.training.datasets import ConfigError, MixCollate, policy
from repsqueeze.training.lit import Classifier
from repsqueeze.training.optim import (
    dbb_identity_l2,
    no_decay_params,
    repvgg_custom_l2,
    warmup_schedule,
    weight_decay_groups,
)
from repsqueeze.zoo import DiverseBranchBlock, RepVGGBlock

pytestmark = pytest.mark.usefixtures("single_thread")
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
SHORT += ["trainer.limit_test_batches=1", "data.batch_size=16"]


def _digits_net(block: str = "repvgg", **kwargs) -> nn.Module:
    return create_model("digits_net", block=block, num_classes=10, in_channels=1, **kwargs)


def _lrs(scheduler, optimizer, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


# --- schedules -------------------------------------------------------------------------------


def test_warmup_then_cosine_per_step():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = warmup_schedule(
        optimizer, total_steps=40, steps_per_epoch=4, warmup_epochs=2, warmup_start_factor=0.1
    )
    lrs = _lrs(scheduler, optimizer, 40)
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[:9] == pytest.approx([0.01 + 0.09 * i / 8 for i in range(9)])  # linear to lr
    assert lrs[8] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[8:], lrs[9:], strict=False))  # then decays
    assert lrs[-1] == pytest.approx(0.1 * (1 + math.cos(31 / 32 * math.pi)) / 2)


def test_warmup_then_steps_at_milestone_epochs():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_schedule(
        optimizer, 40, 4, warmup_epochs=1, decay="step", milestones=[3, 6], gamma=0.5
    )
    lrs = _lrs(scheduler, optimizer, 40)
    assert lrs[4:12] == pytest.approx([1.0] * 8)  # warmup ends at step 4; epochs 1-2 full lr
    assert lrs[12:24] == pytest.approx([0.5] * 12)  # from epoch 3
    assert lrs[24:] == pytest.approx([0.25] * 16)  # from epoch 6


def test_schedule_without_warmup_and_bad_arguments():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = warmup_schedule(optimizer, 10, 5, min_lr=0.1)
    assert isinstance(cosine, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert _lrs(cosine, optimizer, 11)[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="decay must be"):
        warmup_schedule(optimizer, 10, 5, decay="linear")
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_schedule(optimizer, 10, 5, warmup_epochs=-1)


def test_per_step_schedule_is_stepped_every_optimizer_step(compose_train, single_thread):
    cfg = compose_train("scheduler=warmup_cosine", "scheduler.warmup_epochs=1", *SHORT)
    cfg.trainer.max_epochs = 2
    cfg.test = cfg.deploy = False
    _, objects = train(cfg)
    trainer = objects["trainer"]
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step"
    assert config.scheduler.last_epoch == trainer.global_step == 4
    # 2 steps per epoch: warmup over the first 2 steps, then a cosine over the other 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)


# --- weight decay ----------------------------------------------------------------------------


def test_no_decay_on_norms_biases_and_scales():
    net = create_model(
        "repvgg_a0", block="repvgg", num_classes=10, cifar_stem=True, online_norm=True
    )
    decay, rest = weight_decay_groups(net)
    assert rest["weight_decay"] == 0.0 and "weight_decay" not in decay
    names = {id(p): n for n, p in net.named_parameters()}
    undecayed = {names[id(p)] for p in rest["params"]}
    scales = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert scales and all(f"{n}.weight" in undecayed for n in scales)  # (C, 1, 1, 1) scales
    for name, p in net.named_parameters():
        if p.ndim <= 1 or name.endswith(".bias"):
            assert name in undecayed, name
    assert all(p.ndim == 4 or p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(net.parameters()))
    everything, nothing = weight_decay_groups(net, no_decay_norm_bias=False)
    assert not nothing["params"] and len(everything["params"]) == len(list(net.parameters()))


def test_classifier_puts_no_decay_parameters_in_a_zero_decay_group():
    sgd = functools.partial(torch.optim.SGD, lr=0.1, weight_decay=1e-4)
    model = Classifier(_digits_net(), num_classes=10, optimizer=sgd, no_decay_norm_bias=True)
    decay, rest = model.configure_optimizers().param_groups
    assert decay["weight_decay"] == 1e-4 and rest["weight_decay"] == 0.0
    assert {id(p) for p in rest["params"]} == {id(p) for p in no_decay_params(model.net)}
    plain = Classifier(_digits_net(), num_classes=10, optimizer=sgd).configure_optimizers()
    assert len(plain.param_groups) == 1  # the default: every parameter decayed


def _official_custom_l2(block: RepVGGBlock) -> torch.Tensor:
    """RepVGG's get_custom_L2 for a 3x3 block, written out over its two conv-BN branches."""
    (k3, bn3), (k1, bn1) = (tuple(block.branches[i]) for i in (0, 1))
    t3 = (bn3.weight / (bn3.running_var + bn3.eps).sqrt()).reshape(-1, 1, 1, 1).detach()
    t1 = (bn1.weight / (bn1.running_var + bn1.eps).sqrt()).reshape(-1, 1, 1, 1).detach()
    ring = (k3.weight**2).sum() - (k3.weight[:, :, 1:2, 1:2] ** 2).sum()
    centre = k3.weight[:, :, 1:2, 1:2] * t3 + k1.weight * t1
    return ring + (centre**2 / (t3**2 + t1**2)).sum()


def test_repvgg_custom_l2_is_the_papers(randomize_bn, generator):
    blocks = nn.Sequential(RepVGGBlock(4, 4), RepVGGBlock(4, 6, stride=2))
    randomize_bn(blocks, generator)
    regularizer = repvgg_custom_l2(blocks)
    expected = sum(_official_custom_l2(b) for b in blocks)
    torch.testing.assert_close(regularizer.term(), expected, rtol=1e-6, atol=0)
    weights = {id(p) for b in blocks for p in (b.branches[0][0].weight, b.branches[1][0].weight)}
    assert {id(p) for p in regularizer.params} == weights
    regularizer.term().backward()
    assert all(b.branches[0][1].weight.grad is None for b in blocks)  # BN scales detached
    with pytest.raises(ValueError, match="no RepVGG block.*; use block=repvgg"):
        repvgg_custom_l2(_digits_net("dbb"))


def test_dbb_identity_l2_is_zero_at_init_and_pulls_towards_the_identity():
    block = DiverseBranchBlock(4, 4)
    regularizer = dbb_identity_l2(block)
    (conv,) = regularizer.params
    assert conv.shape == (4, 4, 1, 1)
    assert regularizer.term() == 0
    identity = torch.eye(4).reshape(4, 4, 1, 1)
    with torch.no_grad():
        conv.add_(torch.randn_like(conv))
    torch.testing.assert_close(regularizer.term(), ((conv - identity) ** 2).sum())
    optimizer = torch.optim.SGD([conv], lr=0.25)
    for _ in range(40):
        optimizer.zero_grad()
        regularizer.term().backward()
        optimizer.step()
    torch.testing.assert_close(conv.detach(), identity, atol=1e-6, rtol=0)
    # the pooling branch's 1x1 (also 4 layers long) is not the identity-initialised one
    assert len(dbb_identity_l2(_digits_net("dbb")).params) == 4
    with pytest.raises(ValueError, match="; use block=dbb"):
        dbb_identity_l2(_digits_net("repvgg"))


@pytest.mark.parametrize(("block", "knob"), [("repvgg", "repvgg_custom_l2"), ("dbb", "dbb_identity_l2")])  # fmt: skip
def test_regulariser_replaces_decay_and_enters_the_loss(block, knob):
    sgd = functools.partial(torch.optim.SGD, lr=0.1, weight_decay=0.5)
    model = Classifier(
        _digits_net(block), num_classes=10, optimizer=sgd, no_decay_norm_bias=True, **{knob: True}
    )
    optimizer = model.configure_optimizers()
    (regularizer,) = model.regularizers
    covered = {id(p) for p in regularizer.params}
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert covered and not covered & decayed
    batch = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    model.log = lambda *args, **kwargs: None
    with torch.no_grad():
        for p in regularizer.params:
            p.add_(0.1)
        plain = model._step(batch, model.train_metrics)
        total = model.training_step(batch, 0)
    torch.testing.assert_close(total - plain, 0.25 * regularizer.term())


# --- soft targets and augmentation -----------------------------------------------------------


def test_soft_targets_train_and_count_accuracy_against_the_main_class():
    model = Classifier(
        _digits_net(), num_classes=10, optimizer=functools.partial(torch.optim.SGD, lr=0.1)
    )
    model.log = lambda *args, **kwargs: None
    x = torch.randn(6, 1, 8, 8)
    hard = torch.tensor([0, 1, 2, 3, 4, 5])
    soft = 0.7 * nn.functional.one_hot(hard, 10).float() + 0.3 * nn.functional.one_hot(hard.flip(0), 10)  # fmt: skip
    loss = model._step((x, soft), model.train_metrics)
    logits = model(x)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits, soft))
    expected = (logits.argmax(1) == hard).float().mean()
    torch.testing.assert_close(model.train_metrics["acc"].compute(), expected)


def test_mix_collate_gives_probabilities():
    samples = [(torch.rand(3, 8, 8), i % 4) for i in range(8)]
    for kwargs in ({"mixup_alpha": 0.2}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}):  # fmt: skip
        x, y = MixCollate(4, **kwargs)(samples)
        assert x.shape == (8, 3, 8, 8) and y.shape == (8, 4)
        torch.testing.assert_close(y.sum(1), torch.ones(8))
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        MixCollate(4)


@pytest.mark.parametrize("name", ["randaugment", "trivialaugment", "autoaugment"])
def test_auto_augment_policies_on_images_and_digits(name):
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    (transform,) = policy(name)
    assert transform(image).shape == image.shape
    digits = DigitsDataModule(auto_augment=name, random_erasing=0.5, crop_padding=1)
    digits.setup()
    x, y = digits.train_set[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, torch.Tensor)
    assert isinstance(digits.val_set, torch.utils.data.TensorDataset)  # val: no augmentation


def test_unknown_augmentation_names_the_key():
    with pytest.raises(ConfigError, match="auto_augment='rand'"):
        DigitsDataModule(auto_augment="rand")
    with pytest.raises(ConfigError, match="random_erasing=1.5"):
        DigitsDataModule(random_erasing=1.5)
    with pytest.raises(ConfigError, match="mixup_alpha=-1"):
        DigitsDataModule(mixup_alpha=-1)


def test_digits_augmentation_changes_training_images_only():
    plain = DigitsDataModule()
    plain.setup()
    augmented = DigitsDataModule(crop_padding=2, random_erasing=1.0)
    augmented.setup()
    x, y = augmented.train_set[3]
    x0, y0 = plain.train_set[3]
    assert y == y0 and not torch.equal(x, x0)
    assert torch.equal(augmented.val_set.tensors[0], plain.val_set.tensors[0])
    mixed = DigitsDataModule(mixup_alpha=0.4, batch_size=16)
    mixed.setup()
    xb, yb = next(iter(mixed.train_dataloader()))
    assert yb.shape == (16, 10)
    assert next(iter(mixed.val_dataloader()))[1].shape == (16,)


def test_image_folder_train_and_eval_transforms(tmp_path):
    root = image_folder(tmp_path / "folder", size=40, width=44)
    dm = ImageFolderDataModule(
        root, batch_size=4, num_workers=0, image_size=24, val_fraction=0.25,
        auto_augment="trivialaugment", random_erasing=0.5, cutmix_alpha=1.0,
        interpolation="bicubic",
    )  # fmt: skip
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 24, 24) and y.shape == (4, 2)
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (2, 3, 24, 24) and yv.shape == (2,)
    assert torch.equal(xv, next(iter(dm.val_dataloader()))[0])  # evaluation is deterministic
    with pytest.raises(ConfigError, match="interpolation='nearest'"):
        ImageFolderDataModule(root, interpolation="nearest")


# --- EMA, monitor, summary, knobs together ---------------------------------------------------


def test_ema_weights_are_validated_checkpointed_tested_and_deployed(
    compose_train, tmp_path, single_thread
):
    cfg = compose_train("callbacks=ema", "callbacks.ema.decay=0.5", "logger=csv", *SHORT)
    metrics, objects = train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    averaged = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    raw = {k[4:]: v for k, v in ckpt["current_model_state"].items() if k.startswith("net.")}
    weight = "head.weight" if "head.weight" in averaged else next(iter(averaged))
    assert not torch.equal(averaged[weight], raw[weight])  # the two are kept apart
    net = objects["model"].net.cpu()
    for name, value in net.state_dict().items():  # tested and deployed: the averaged ones
        torch.testing.assert_close(value, averaged[name], rtol=0, atol=0)
    payload = torch.load(tmp_path / "deployed.pt", weights_only=True)
    expected = deploy(net.eval()).state_dict()
    for name, value in payload["state_dict"].items():
        torch.testing.assert_close(value, expected[name])
    notes: list[str] = []
    loaded, _ = deploy_cli.load_checkpoint(tmp_path / "checkpoints" / "best.ckpt", notes)
    torch.testing.assert_close(loaded.state_dict()[weight], averaged[weight], rtol=0, atol=0)
    assert notes == ["trained with weight averaging (EMA): the averaged weights are deployed"]
    lines = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "lr-AdamW" in lines[0].split(",")  # the learning-rate monitor logged
    assert metrics["test/max_logit_diff"] < 1e-5


def test_model_summary_counts_flops():
    dm = DigitsDataModule()
    model = Classifier(_digits_net(), num_classes=10)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.datamodule = dm  # what fit does before calling setup
    model._trainer = trainer
    model.setup("fit")
    model._trainer = None
    assert model.example_input_array.shape == (1, 1, 8, 8)
    assert ModelSummary(model).total_flops > 0


@pytest.mark.slow
def test_channels_last_bf16_compile_clip_ema_mixup_together(
    compose_train, monkeypatch, single_thread
):
    calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, **kw: calls.append(kw) or real_compile(net, **kw))  # fmt: skip
    cfg = compose_train(
        "model.channels_last=true", "trainer.precision=bf16-mixed",
        "trainer.gradient_clip_val=1.0", "callbacks=ema", "scheduler=warmup_cosine",
        "scheduler.warmup_epochs=0.5", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
        "model.no_decay_norm_bias=true", "debug=fdr",
    )  # fmt: skip
    cfg.model.compile = {"backend": "eager"}
    metrics, objects = train(cfg)
    assert calls == [{"backend": "eager"}]
    kernels = [p for p in objects["model"].net.parameters() if p.ndim == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels)
    assert objects["trainer"].precision == "bf16-mixed"
    assert metrics["test/max_logit_diff"] < 1e-5


def test_missing_logger_package_is_one_line_naming_the_extra(
    compose_train, monkeypatch, single_thread
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        repsqueeze.training.loggers.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a),
    )
    for option in ("wandb", "mlflow"):
        with pytest.raises(ConfigError) as err:
            train(compose_train(f"logger={option}", "debug=fdr"))
        line = one_line(err.value)
        assert f"pip install 'repsqueeze[{option}]'" in line and "\n" not in line


def test_rank_zero_filter(monkeypatch):
    record = logging.LogRecord("train", logging.INFO, __file__, 1, "message", None, None)
    rank_filter = repsqueeze.training.loggers.RankZeroFilter()
    monkeypatch.setattr(repsqueeze.training.loggers.rank_zero_only, "rank", 1)
    assert not rank_filter.filter(record)
    monkeypatch.setattr(repsqueeze.training.loggers.rank_zero_only, "rank", 0)
    assert rank_filter.filter(record)
