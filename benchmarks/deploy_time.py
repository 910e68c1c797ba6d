"""Deploy time: how long a whole model takes to reach its deployed form.

    python benchmarks/deploy_time.py              # 1 thread: results_deploy.{md,json} (~3 min)
    python benchmarks/deploy_time.py --quick      # tiny sizes, the CI smoke test (temp folder)

Rows, all in one process at 1 thread, interleaved (every variant once per round, each on a
fresh copy of its model built outside the timed region):

* repsqueeze's ``repvgg_a0`` (1000 classes) with every block kind, ``rs.deploy`` in place
  and as a copy (its default); ``plain``, ``expand_ck`` and ``expand_cl`` in place, in a
  second interleaved group with a fifth of the rounds (timm's row timed beside them);
* timm's ``repvgg_a0`` with ``timm.utils.reparameterize_model``, in place and as a copy (its
  default), the reference of the ratios;
* the official fusions (RepVGG ``repvgg_model_convert``; DBB, ACNet and OREPA
  ``switch_to_deploy`` of every block) on the same 22 convolution shapes, run from copies
  of their repositories (:mod:`benchmarks.mirror`: ``$REPSQUEEZE_MIRROR``, default
  ``/work/.mirror``); a repository that is not there is skipped with a note;
* a torchvision ResNet-50 expanded with ``rs.expand``: ``rs.deploy`` and ``rs.contract``.

Figures: median seconds with the interquartile range, the ratio to timm's row of the same
form and, for the kinds that have one, to the official fusion of the same kind (medians of
the per-round ratios, with their interquartile ranges).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

if __package__ in (None, ""):  # python benchmarks/deploy_time.py: the root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import repsqueeze as rs  # noqa: E402
from benchmarks import mirror  # noqa: E402
from benchmarks.common import command, randomize_bn  # noqa: E402
from repsqueeze import timing  # noqa: E402
from repsqueeze.models import create_model  # noqa: E402
from repsqueeze.tables import table  # noqa: E402

HERE = Path(__file__).resolve().parent
KINDS = ("repvgg", "acb", "mobileone", "qarepvgg", "dbb")
# the other kinds, timed in a second group with fewer rounds (expand_cl: seconds of float64
# matrix products per deploy), in place only
MORE_KINDS = ("plain", "expand_ck", "expand_cl")
TIMM = "timm reparameterize_model"

# official repositories: (owner/name, module holding the block or the conversion)
OFFICIAL = {
    "official RepVGG repvgg_model_convert": ("DingXiaoH/RepVGG", "repvgg"),
    "official DBB switch_to_deploy": ("DingXiaoH/DiverseBranchBlock", "diversebranchblock"),
    "official ACNet switch_to_deploy": ("DingXiaoH/ACNet", "acnet.acb"),
    "official OREPA switch_to_deploy": ("JUGGHM/OREPA_CVPR2022", "blocks"),
}

# the official fusion of the same block kind, for the "x official" ratio
PEERS = {
    "repsqueeze repvgg (copy)": "official RepVGG repvgg_model_convert",
    "repsqueeze acb": "official ACNet switch_to_deploy",
    "repsqueeze dbb": "official DBB switch_to_deploy",
}

Variant = tuple[Callable[[], nn.Module], Callable[[nn.Module], object]]
Row = tuple[str, str, Variant]  # (model, form, variant)


# --- official code from fetched repositories ---------------------------------------------------
class ShapeStack(nn.Module):
    """Blocks of another library on given ``(c_in, c_out, stride)`` 3x3 shapes, ReLU between."""

    def __init__(self, make: Callable[[int, int, int], nn.Module], shapes: list) -> None:
        super().__init__()
        self.body = nn.Sequential(*(nn.Sequential(make(*s), nn.ReLU()) for s in shapes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def switch_all(model: nn.Module) -> nn.Module:
    """The official scripts' conversion: ``switch_to_deploy()`` of every module that has one."""
    for m in list(model.modules()):
        if hasattr(m, "switch_to_deploy"):
            m.switch_to_deploy()
    return model


def official_variant(label: str, module: ModuleType, shapes: list) -> Variant:
    if label.startswith("official RepVGG"):
        return lambda: module.create_RepVGG_A0(), module.repvgg_model_convert
    name = {"DBB": "DiverseBranchBlock", "ACNet": "ACBlock", "OREPA": "OREPA"}[label.split()[1]]
    cls = getattr(module, name)
    return lambda: ShapeStack(lambda i, o, s: cls(i, o, 3, stride=s, padding=1), shapes), switch_all


def a0_shapes(quick: bool) -> list[tuple[int, int, int]]:
    """``(c_in, c_out, stride)`` of the 3x3 convolutions of repsqueeze's ``repvgg_a0``."""
    model = create_model("repvgg_a0", block="plain", num_classes=10, deployed=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    shapes = [(c.in_channels, c.out_channels, c.stride[0]) for c in convs]
    return shapes[:3] if quick else shapes


# --- the variants ----------------------------------------------------------------------------
def variants(
    quick: bool, kinds: tuple[str, ...] = KINDS, more: bool = True
) -> tuple[dict[str, Row], list[str]]:
    """``{row: (model, form, (build, deploy))}`` and notes on the rows skipped.

    Args:
        quick: tiny sizes.
        kinds: repsqueeze block kinds.
        more: also the copy forms and the official fusions.
    """
    classes = 10 if quick else 1000
    name = "repvgg_a0"
    ours = "digits_net" if quick else name
    rows: dict[str, Row] = {}
    for kind in kinds[:2] if quick else kinds:

        def build(kind=kind) -> nn.Module:
            extra = {"in_channels": 1} if quick else {}
            return randomize_bn(create_model(ours, block=kind, num_classes=classes, **extra))

        in_place = (build, lambda m: rs.deploy(m, inplace=True))
        rows[f"repsqueeze {kind}"] = (ours, "in place", in_place)
        if more:
            rows[f"repsqueeze {kind} (copy)"] = (ours, "copy", (build, rs.deploy))
    notes = []
    try:
        import timm
        from timm.utils.model import reparameterize_model
    except ImportError:
        notes.append(f"{TIMM}: timm is not installed")
    else:

        def build_timm() -> nn.Module:
            return randomize_bn(timm.create_model(name, num_classes=classes))

        in_place = (build_timm, lambda m: reparameterize_model(m, inplace=True))
        rows[TIMM] = (name, "in place", in_place)
        if more:
            rows[f"{TIMM} (copy)"] = (name, "copy", (build_timm, reparameterize_model))
    if not more:
        return rows, notes
    shapes = a0_shapes(quick)
    for label, (repo, module_name) in OFFICIAL.items():
        with contextlib.redirect_stdout(sys.stderr):  # the official modules print
            module = mirror.official_module(repo, module_name)
        if module is None:
            notes.append(f"{label}: skipped, no copy of {repo} in {mirror.MIRROR}")
            continue
        build, fn = official_variant(label, module, shapes)
        form = "copy" if "repvgg_model_convert" in label else "in place"
        model = f"{name} shapes" if "switch_to_deploy" in label else name
        rows[label] = (model, form, (lambda build=build: randomize_bn(build()), fn))
    return rows, notes


def interleaved(rows: dict[str, Row], rounds: int) -> dict[str, list[float]]:
    """Seconds of each variant's deploy per round, each on a fresh model, interleaved."""
    with contextlib.redirect_stdout(sys.stderr):  # the official builders print
        models = {k: build() for k, (_, _, (build, _)) in rows.items()}
    deploys = {k: deploy for k, (_, _, (_, deploy)) in rows.items()}
    fresh = {k: (lambda m=m: copy.deepcopy(m)) for k, m in models.items()}
    return timing.interleaved_fresh(deploys, fresh, rounds)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], 0.0
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), q[2] - q[0]


def bench_a0(
    quick: bool, rounds: int, kinds: tuple[str, ...] = KINDS, more: bool = True
) -> tuple[list[dict], list[str]]:
    rows, notes = variants(quick, kinds, more)
    times = interleaved(rows, rounds)
    out = []
    for key, (model, form, _) in rows.items():
        median, iqr = _quartiles(times[key])
        ref = TIMM if form == "in place" else f"{TIMM} (copy)"
        row = {"model": model, "variant": key, "form": form, "s": median, "IQR s": iqr}
        for column, other in (("x timm", ref), ("x official", PEERS.get(key))):
            row[column] = row[f"IQR {column}"] = None  # n/a: every row has every column
            if other in times:
                ratios = [a / b for a, b in zip(times[key], times[other], strict=True)]
                row[column], row[f"IQR {column}"] = _quartiles(ratios)
        out.append(row)
    return out, notes


def bench_resnet50(quick: bool, rounds: int) -> list[dict]:
    """``rs.deploy`` and ``rs.contract`` of an expanded torchvision ResNet-50 (quick: two
    torchvision conv-BN-ReLU layers)."""
    import torchvision

    if quick:
        name, layer = "two conv-BN-ReLU", torchvision.ops.Conv2dNormActivation
        plain = nn.Sequential(layer(3, 8), layer(8, 8))
    else:
        name, plain = "resnet50", torchvision.models.resnet50()
    model = randomize_bn(rs.expand(plain))
    fns = {"rs.deploy": rs.deploy, "rs.contract": rs.contract}  # both return a new model
    times = timing.interleaved_fresh(fns, dict.fromkeys(fns, lambda: model), rounds)
    rows = []
    for key, ts in times.items():
        median, iqr = _quartiles(ts)
        variant = f"{key} (expanded {name}, repvgg blocks)"
        rows.append({"model": name, "variant": variant, "form": "copy", "s": median, "IQR s": iqr})
    return rows


def run(quick: bool = False, rounds: int | None = None) -> dict:
    """The table's rows and notes; pins 1 thread for the run and restores the count."""
    rounds = rounds or (1 if quick else 15)
    with timing.threads(1), torch.no_grad():
        a0, notes = bench_a0(quick, rounds)
        if not quick:
            others, _ = bench_a0(quick, max(1, rounds // 5), MORE_KINDS, more=False)
            a0 += [r for r in others if r["variant"] != TIMM]
        resnet = bench_resnet50(quick, max(1, rounds // 3))
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "threads": 1,
        "rounds": rounds,
        "quick": quick,
        "command": command(),
    }
    return {"environment": env, "deploy": a0 + resnet, "notes": notes}


def markdown(results: dict) -> str:
    env = results["environment"]
    command = env["command"] or "benchmarks.deploy_time.run()"
    notes = "".join(f"\n- {n}" for n in results["notes"])
    return (
        f"# Deploy time\n\n`{command}`; torch {env['torch']}; CPU, 1 thread; "
        f"{env['rounds']} interleaved rounds (the plain and expand rows: a fifth of them, "
        "beside timm's again); medians with interquartile ranges; ratios to "
        f"timm's row of the same form and to the official fusion of the same kind.\n\n"
        f"{table(results['deploy'])}\n" + (f"\nSkipped:{notes}\n" if notes else "")
    )


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15)")
    parser.add_argument("--out", default=None, help="writes OUT.md and OUT.json")
    args = parser.parse_args(argv)
    default = (
        Path(tempfile.gettempdir()) / "repsqueeze-bench-quick" / "results_deploy"
        if args.quick
        else HERE / "results_deploy"
    )
    out = Path(args.out) if args.out else default
    results = run(args.quick, args.rounds)
    write(results, out)
    print(markdown(results))
    print(f"wrote {out}.md, {out}.json", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
