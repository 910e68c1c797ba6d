"""Probe both command lines with bad settings and broken runs; count how each one ends.

    python benchmarks/cli_probes.py                 # this checkout, all probes (about 10 min)
    python benchmarks/cli_probes.py --root DIR      # another checkout (e.g. an older commit)
    python benchmarks/cli_probes.py -k deploy       # only probes whose name contains "deploy"
    python benchmarks/cli_probes.py --start SIGTERM # from the first probe named ...SIGTERM...

Every probe runs ``python train.py ...`` or ``python deploy.py ...`` in a fresh folder, as a
user would, and is put in one class:

- ``clear``: what the probe expects (a refusal: exit status 1 and one line
  ``<script>: error: ...`` naming the setting or file, no traceback; a run that should work:
  exit 0 and its check holds);
- ``traceback``: a Python traceback, a crash (exit status other than 0 or 1), an error
  that is not one last line ``<script>: error: ...``, or a raw error that names neither the
  setting nor the file at fault;
- ``silent-wrong``: exit 0 where the run should fail, or a run whose check does not hold
  (``last.ckpt`` not the last epoch, best forgotten on resume, exit 0 after SIGTERM, ...);
- ``data-loss``: a file placed in the folder by the probe (a user's) is gone afterwards.

Disk-full and read-only probes mount small tmpfs folders and run only as root (else skipped).
Prints one row per probe and the totals; ``--json FILE`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/cli_probes.py: the root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.probe_cases import DEPLOY, TRAIN, Probe  # noqa: E402
from benchmarks.probe_setups import SHORT, probe_env  # noqa: E402

NEUTRAL = {
    "measure.enabled=false",
    "formats.onnx=false",
    "test=false",
    "deploy=false",
    "data=digits",
    "int8.enabled=true",
}


def _named(probe: Probe, extra: list[str]) -> str:
    """What a clear refusal must name: ``probe.names``, else the key of the first override
    that is the probe's own (not a shortening one), else of the setup's last (a file)."""
    if probe.names is not None:
        return probe.names
    own = [o for o in probe.overrides if o not in SHORT and o not in NEUTRAL]
    chosen = own[0] if own else extra[-1]
    return chosen.split("=", 1)[0].lstrip("+")


def classify(probe: Probe, tmp: Path, result: subprocess.CompletedProcess, extra: list[str]) -> str:
    out = (result.stdout + result.stderr).strip()
    if probe.user_file and not (tmp / probe.user_file).exists():
        return "data-loss"
    if result.returncode not in (0, 1) and probe.signal_after is None:
        return "traceback"
    if "Traceback (most recent call last)" in out:
        return "traceback"
    if probe.fails and result.returncode == 0:
        return "silent-wrong"
    if probe.check is not None:
        try:
            ok = probe.check(tmp, result)
        except (ValueError, OSError, KeyError):
            ok = False
        if not ok:
            return "silent-wrong"
    if result.returncode == 1 and probe.signal_after is None:
        errors = [i for i, line in enumerate(result.stderr.splitlines()) if ": error: " in line]
        lines = result.stderr.strip().splitlines()
        if not errors or errors[-1] != len(lines) - 1:  # a sweep: one line per failed job
            return "traceback"
        if probe.fails and _named(probe, extra) not in lines[-1]:
            return "traceback"
        return "clear" if probe.fails or probe.check is not None else "silent-wrong"
    return "clear"


def run_probe(probe: Probe, root: Path) -> tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="probe-") as name:
        tmp = Path(name)
        mounted = []
        try:
            extra = probe.setup(tmp, root) if probe.setup else []
            mounted = [tmp / "mnt"] if (tmp / "mnt").is_dir() else []
            command = [sys.executable, str(root / probe.script), *probe.flags]
            if probe.script == "train.py":
                command.append(f"paths.root_dir={tmp}")
            elif not any(o.startswith(("input_shape=", "data=")) for o in probe.overrides):
                command.append("input_shape=[1,8,8]")
            command += [*probe.overrides, *extra]
            proc = subprocess.Popen(
                command, cwd=tmp, env=probe_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            if probe.signal_after is not None:
                time.sleep(probe.signal_after)
                proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=600)
            result = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
            verdict = classify(probe, tmp, result, extra)
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            return verdict, f"exit {result.returncode}: {lines[-1][:400] if lines else ''}"
        finally:
            for folder in mounted:
                subprocess.run(["umount", str(folder)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("-k", default="", help="only probes whose name contains this")
    parser.add_argument("--start", default="", help="skip the probes before the first whose name contains this")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the verdicts here")
    args = parser.parse_args()
    root = args.root.resolve()
    counts: Counter = Counter()
    verdicts = {}
    probes = TRAIN + DEPLOY
    first = next((i for i, p in enumerate(probes) if args.start in p.name), 0)
    for probe in probes[first:]:
        if args.k not in probe.name:
            continue
        if probe.root_only and os.geteuid() != 0:
            print(f"{'skipped':13} {probe.name} (needs root to mount tmpfs)")
            continue
        verdict, detail = run_probe(probe, root)
        counts[verdict] += 1
        verdicts[probe.name] = {"class": verdict, "detail": detail}
        print(f"{verdict:13} {probe.name:40} {detail}", flush=True)
    classes = ["clear", "traceback", "silent-wrong", "data-loss"]
    print("totals: " + ", ".join(f"{c} {counts[c]}" for c in classes))
    if args.json:
        args.json.write_text(json.dumps({"root": str(root), "probes": verdicts, "totals": counts}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
