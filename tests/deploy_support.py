"""Support of the deploy tests: checkpoints written here (from untrained networks with
randomized BatchNorm statistics, or broken on purpose) and checks of an export folder."""

import pickle
from pathlib import Path

import torch
from helpers import randomize_bn

from repsqueeze import files as folders
from repsqueeze.training.lit import Classifier

ARTIFACTS = {"deployed.pt", "model.pt2", "model.onnx", "report.json"}
NET_CONFIG = {"name": "digits_net", "block": "dbb", "num_classes": 10, "in_channels": 1}
REPVGG = {**NET_CONFIG, "block": "repvgg"}
TOL64, TOL32 = 1e-10, 1e-5
MEASURED = ["measure.latency=true", "measure.min_run_time=0.01", "formats.onnx=false"]
FAST = ["measure.enabled=false", "formats.onnx=false"]
# deployed.pt and report.json only, on a random batch of the digits shape: the quickest run
DEPLOYED_ONLY = ["input_shape=[1,8,8]", "formats.pt2=false", *FAST]


def write_checkpoint(path: Path, net_config: dict, seed: int = 0, edit=None) -> Path:
    """A Lightning-style checkpoint of an untrained network, BN statistics randomized;
    ``edit(state_dict)`` may break it first."""
    model = Classifier(net_config)
    randomize_bn(model.net, torch.Generator().manual_seed(seed))
    state = model.state_dict()
    if edit is not None:
        edit(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "hyper_parameters": dict(model.hparams)}, path)
    return path


class CreatesMarker:
    """Pickles to ``open(marker, "w")``: unpickling it with code execution creates the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# each kind of file the checkpoint loader refuses, and what its one line says
BAD_FILES = {
    "missing": "checkpoint not found",
    "random_bytes": "cannot be loaded safely",
    "tensor": "not a Lightning checkpoint",
    "pickled_object": "cannot be loaded safely",
    "plain_pickle": "cannot be loaded safely",
    "no_net_config": "no net_config",
}


def bad_file(kind: str, folder: Path) -> Path:
    """A file of :data:`BAD_FILES`; ``folder / "MARKER"`` appears if pickled code ran."""
    path = folder / f"{kind}.ckpt"
    marker = folder / "MARKER"
    if kind == "random_bytes":  # seeded: some byte strings fail as a pickle, some elsewhere
        gen = torch.Generator().manual_seed(0)
        noise = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=gen)
        path.write_bytes(noise.numpy().tobytes())
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


def no_outputs(out_dir: Path) -> None:
    """Nothing in the output folder and no staging folder left beside it."""
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert not list(out_dir.parent.glob(f"{folders.PREFIX}*"))


def listing(out_dir: Path) -> set[str]:
    """The files of an export folder deploy.py made: its marker is there, and the rest."""
    names = {p.name for p in out_dir.iterdir()}
    assert folders.MARKER in names
    return names - {folders.MARKER}


def check_report(report: dict, inputs: set[str], files: set[str]) -> None:
    """A deploy report: errors within the tolerances on ``inputs``, every file checked."""
    assert set(report["verification"]) == inputs
    for errors in report["verification"].values():
        assert 0 <= errors["float64"] <= TOL64
        assert 0 <= errors["float32"] <= TOL32
    assert set(report["checks"]) == files - {"report.json"}
    assert report["checks"]["deployed.pt"]["max_abs_diff"] == 0
    for name, check in report["checks"].items():
        assert check["relative_diff"] <= (1e-4 if name == "model.onnx" else 1e-5), name
    assert set(report["files"]) == files - {"report.json"}
    assert "TF32" in report["numerics"]
    m = report["measurements"]
    assert m["deployed"]["params"] < m["training"]["params"]
    assert m["deployed"]["macs_per_sample"] < m["training"]["macs_per_sample"]
