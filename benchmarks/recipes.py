"""What the training-recipe knobs do on the embedded digits set, and what they cost.

    python benchmarks/recipes.py            # about 3-5 minutes on 2 busy cores, 1 thread
    python benchmarks/recipes.py --quick    # 1 seed, fewer epochs: a smoke run (not committed)

Writes ``benchmarks/results_recipes.{md,json}``:

1. Knobs, 3 seeds each, ``digits_net`` with RepVGG blocks, AdamW: the baseline (a per-epoch
   cosine), then + per-step warmup and EMA, then + augmentation (RandomCrop with padding 1,
   RandomErasing, MixUp). Test accuracy of the weights ``train.py`` would deploy (the EMA
   ones when EMA is on), and the median time from one training step to the next (loader,
   step and callbacks included), with its ratio to the baseline.
2. Loader alone vs training step: images/s of iterating the training loader (with each
   variant's augmentation) against images/s of the training steps, on digits; and the
   loader alone on a synthetic ImageFolder with the standard ImageNet training transforms
   (224 crops, with and without RandAugment), 0 and 2 workers.
3. Fine-tuning: ``digits_net`` first trained on the digits 0-4 ("pretrained"), then trained
   for a few epochs on the digits 5-9 with a new head, against the same number of epochs
   from scratch.

Everything runs in one process with one intra-op thread; the variants are interleaved per
seed, and times are medians with their spread over seeds.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from repsqueeze.tables import table
from repsqueeze.training.datamodules import DigitsDataModule, ImageFolderDataModule
from repsqueeze.training.lit import Classifier
from repsqueeze.training.optim import warmup_schedule

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "baseline": {},
    "+ warmup + EMA": {"warmup": True, "ema": True},
    "+ augmentation": {"warmup": True, "ema": True, "augment": True},
}
AUGMENT = {"crop_padding": 1, "random_erasing": 0.25, "mixup_alpha": 0.2}


class StepTimer(Callback):
    """Seconds between the starts of consecutive training batches (after the first epoch)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None and trainer.current_epoch > 0:
            self.times.append(now - self._last)
        self._last = now

    def on_train_epoch_end(self, *args: Any) -> None:
        self._last = None  # validation is not a step


def _classifier(num_classes: int, epochs: int, warmup: bool) -> Classifier:
    net = {"name": "digits_net", "block": "repvgg", "num_classes": num_classes, "in_channels": 1}
    optimizer = functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-2)
    if warmup:
        scheduler = functools.partial(warmup_schedule, warmup_epochs=1, warmup_start_factor=0.01)
    else:
        scheduler = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=epochs)
    return Classifier(net, optimizer=optimizer, scheduler=scheduler, no_decay_norm_bias=warmup)


def _trainer(epochs: int, callbacks: list[Callback]) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0,
    )  # fmt: skip


def _test_acc(model: Classifier, dm: L.LightningDataModule) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def run_variant(name: str, seed: int, epochs: int) -> dict:
    knobs = VARIANTS[name]
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(seed=0, **(AUGMENT if knobs.get("augment") else {}))
    model = _classifier(10, epochs, knobs.get("warmup", False))
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    if knobs.get("ema"):
        callbacks.append(EMAWeightAveraging(decay=0.9))
    trainer = _trainer(epochs, callbacks)
    trainer.fit(model, datamodule=dm)  # EMA: the averaged weights are left in the model
    step = statistics.median(timer.times)
    loader = _loader_images_per_s(dm)
    return {
        "variant": name,
        "seed": seed,
        "test_acc": _test_acc(model, dm),
        "step_ms": 1000 * step,
        "step_images_per_s": dm.batch_size / step,
        "loader_images_per_s": loader,
    }


def _loader_images_per_s(dm: L.LightningDataModule, batches: int | None = None) -> float:
    loader = dm.train_dataloader()
    start, images = time.perf_counter(), 0
    for i, (x, _) in enumerate(loader):
        images += len(x)
        if batches is not None and i + 1 >= batches:
            break
    return images / (time.perf_counter() - start)


def imagefolder_loader(root: Path, batches: int) -> list[dict]:
    """Images/s of the ImageNet training loader alone, on synthetic 320x256 JPEGs."""
    for c in range(2):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(64):
            pixels = torch.randint(0, 256, (256, 320, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    rows = []
    for auto_augment in (None, "randaugment"):
        for workers in (0, 2):
            dm = ImageFolderDataModule(
                root, batch_size=32, num_workers=workers, auto_augment=auto_augment,
                val_fraction=0.1,
            )  # fmt: skip
            dm.setup("fit")
            _loader_images_per_s(dm, batches=1)  # start the workers
            rate = statistics.median(_loader_images_per_s(dm, batches) for _ in range(3))
            rows.append({"augmentation": auto_augment or "crop + flip", "workers": workers,
                         "images_per_s": rate})  # fmt: skip
    return rows


class _ClassSubset(L.LightningDataModule):
    """Digits restricted to ``classes`` (relabelled 0..k-1), the same splits as digits."""

    def __init__(self, classes: list[int], seed: int = 0) -> None:
        super().__init__()
        self.base = DigitsDataModule(seed=seed)
        self.classes = classes
        self.num_classes, self.in_channels, self.image_size = len(classes), 1, 8
        self.batch_size = self.base.batch_size

    def setup(self, stage: str | None = None) -> None:
        self.base.setup()
        mapping = torch.full((10,), -1, dtype=torch.long)
        mapping[self.classes] = torch.arange(len(self.classes))
        for split in ("train_set", "val_set", "test_set"):
            x, y = getattr(self.base, split).tensors
            keep = mapping[y] >= 0
            setattr(self, split, TensorDataset(x[keep], mapping[y[keep]]))

    def _loader(self, dataset: TensorDataset | Subset, shuffle: bool):
        return torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def test_dataloader(self):
        return self._loader(self.test_set, False)


def fine_tune(seed: int, pretrain_epochs: int, epochs: int) -> list[dict]:
    L.seed_everything(seed, verbose=False)
    source = _ClassSubset([0, 1, 2, 3, 4])
    pretrained = _classifier(5, pretrain_epochs, warmup=False)
    _trainer(pretrain_epochs, []).fit(pretrained, datamodule=source)
    weights = {k: v for k, v in pretrained.net.state_dict().items() if not k.startswith("head.")}
    rows = []
    for start in ("from scratch", "fine-tuned from digits 0-4"):
        L.seed_everything(seed + 1, verbose=False)
        target = _ClassSubset([5, 6, 7, 8, 9])
        model = _classifier(5, epochs, warmup=False)
        if start != "from scratch":
            missing, unexpected = model.net.load_state_dict(weights, strict=False)
            assert set(missing) == {"head.weight", "head.bias"} and not unexpected
        trainer = _trainer(epochs, [])
        trainer.fit(model, datamodule=target)
        rows.append({"start": start, "seed": seed, "epochs": epochs,
                     "test_acc": _test_acc(model, target)})  # fmt: skip
    return rows


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def summarise(knobs: list[dict], loaders: list[dict], tuned: list[dict]) -> str:
    base = statistics.median(r["step_ms"] for r in knobs if r["variant"] == "baseline")
    rows = []
    for name in VARIANTS:
        runs = [r for r in knobs if r["variant"] == name]
        step = [r["step_ms"] for r in runs]
        rows.append({
            "variant": name,
            "test acc: median [min, max]": _spread([r["test_acc"] for r in runs]),
            "step ms: median [min, max]": _spread(step),
            "step time vs baseline": f"{statistics.median(step) / base:.2f}x",
            "loader alone, images/s": f"{statistics.median(r['loader_images_per_s'] for r in runs):,.0f}",
            "training steps, images/s": f"{statistics.median(r['step_images_per_s'] for r in runs):,.0f}",
        })  # fmt: skip
    tuned_rows = []
    for start in dict.fromkeys(r["start"] for r in tuned):
        runs = [r for r in tuned if r["start"] == start]
        tuned_rows.append({"start": start, "epochs on digits 5-9": runs[0]["epochs"],
                           "test acc: median [min, max]": _spread([r["test_acc"] for r in runs])})  # fmt: skip
    loader_rows = [{**r, "images_per_s": f"{r['images_per_s']:,.0f}"} for r in loaders]
    return "\n".join([
        "# Training-recipe knobs on digits", "",
        f"`python benchmarks/recipes.py`; torch {torch.__version__}, CPU, 1 thread, "
        f"{len({r['seed'] for r in knobs})} seeds.", "",
        "## Knobs: accuracy and step time", "", table(rows), "",
        "## Loader alone: ImageFolder, ImageNet training transforms (224 crops, batch 32)", "",
        table(loader_rows), "",
        "## Fine-tuning from a network trained on another split", "", table(tuned_rows), "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs; not committed")
    parser.add_argument("--out", type=Path, default=None, help="output path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [0, 1, 2]
    epochs = 3 if args.quick else 8
    knobs = [run_variant(name, seed, epochs) for seed in seeds for name in VARIANTS]
    with tempfile.TemporaryDirectory() as tmp:
        loaders = imagefolder_loader(Path(tmp), batches=2 if args.quick else 3)
    tuned = [r for seed in seeds for r in fine_tune(seed, epochs, 2)]
    out = args.out or (Path(tempfile.gettempdir()) / "results_recipes" if args.quick else HERE / "results_recipes")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    environment = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "command": " ".join(["python", *sys.argv]), "epochs": epochs, "seeds": seeds,
    }  # fmt: skip
    payload = {"environment": environment, "knobs": knobs, "loaders": loaders, "fine_tune": tuned}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    text = summarise(knobs, loaders, tuned)
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
