#!/usr/bin/env python
"""Two jobs on one machine: one job alone against two of the same side by side, with the command lines'
threading policy (ahiq.runtime.threads: waiting OpenMP threads spin about 0.1 ms, then sleep; threads sized from the
CPUs a process may use, or the options' runtime.threads) and with torch's defaults (torch loaded before
ahiq sets anything: libgomp's default waits, about 3 ms of spinning, and torch's own thread count).

    python scripts/sharing.py [--cases demo scoring] [--repeats 3] [--threads N] [--spin N ...]

``--threads N``: the policy's jobs with N threads (runtime.threads, --threads). ``--spin N``: also the policy
with GOMP_SPINCOUNT=N set by the user (0 is OMP_WAIT_POLICY=PASSIVE's waits), each a way of its own.

Cases: ``demo``, the demo training (options/demo.yaml, 10 references, 2 epochs; the time is epoch 2's, from
train.log); ``scoring``, ``python -m ahiq score`` with the full-size ViT-B/8 model (random weights) on 4
PIPAL-shaped pairs (288 x 288), 5 random crops each (the time is the whole command's). Each job runs in its
own process, started as a user would; the jobs alone run ``--repeats`` times each way, interleaved, for the
run-to-run spread. Prints one row per case and way:

    <case> <way>: <seconds> s (min <a>, max <b> over <n> runs)[, <x>x the policy's alone]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# torch's defaults: torch loaded first (OpenMP then reads an environment without OMP_WAIT_POLICY), and its
# own thread count passed on as the explicit setting
DEFAULTS = ("import sys, torch; threads = str(torch.get_num_threads()); "
            "sys.argv[0] = {program!r}; from ahiq.cli import main, train_command; "
            "sys.exit(train_command(sys.argv[1:] + ['runtime.threads=' + threads]) if {program!r} == 'train.py' "
            "else main(sys.argv[1:] + ['--threads', threads]))")
DEMO = ["--opt", str(ROOT / "options" / "demo.yaml"), "data.options={references: 10, size: 96, seed: 0}",
        "train.epochs=2", "train.resume=null", "data.num_workers=0"]


def command(case: str, way: str, folder: Path, name: str, threads: int | None) -> list[str]:
    """The command line of one job of ``case``, run ``way`` (defaults, or the policy)."""
    if case == "demo":
        program, arguments = "train.py", [*DEMO, f"name={name}", f"data.root={folder / 'data'}"]
        arguments += [f"runtime.threads={threads}"] if threads and way != "defaults" else []
    else:
        program, arguments = "-m ahiq", ["score", "--pairs", str(folder / "pairs.csv"), "--checkpoint",
                                         str(folder / "AHIQ_vit_p8_epoch33-da3ea303.pth"), "--vit-pretrained",
                                         str(folder / "vit.pth"), "--cnn-pretrained", str(folder / "resnet.pth"),
                                         "--num-crops", "5", "--device", "cpu", "--out", str(folder / f"{name}.csv")]
        arguments += ["--threads", str(threads)] if threads and way != "defaults" else []
    if way == "defaults":
        return [sys.executable, "-c", DEFAULTS.format(program=program), *arguments]
    return [sys.executable, *(program.split() if program.startswith("-m") else [str(ROOT / program)]), *arguments]


def seconds(case: str, folder: Path, name: str, wall: float) -> float:
    if case == "scoring":
        return wall
    log = (folder / "checkpoints" / name / "train.log").read_text()
    return float(re.findall(r" epoch 2 loss \S+ time_s (\S+)", log)[-1])


def run(case: str, ways: list[str], folder: Path, tag: str, threads: int | None = None) -> list[float]:
    """Jobs started together, one per entry of ``ways``; each one's time. A way: "defaults", "policy", or
    "GOMP_SPINCOUNT=N" (the policy with that spin count set by the user)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    names = [f"{tag}_{i}" for i in range(len(ways))]
    start = time.perf_counter()
    jobs = [subprocess.Popen(command(case, way, folder, name, threads), cwd=folder,
                             env={**clean, **dict([way.split("=")] if "=" in way else [])}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for way, name in zip(ways, names)]
    walls = []
    for job in jobs:
        out, _ = job.communicate()
        if job.returncode:
            raise SystemExit(f"{case} job failed:\n{out[-3000:]}")
        walls.append(time.perf_counter() - start)
    return [seconds(case, folder, name, wall) for name, wall in zip(names, walls)]


def prepare(case: str, folder: Path) -> None:
    """The inputs, made once and untimed: the demo's dataset, or the full-size model and the pairs."""
    if case == "demo":
        run(case, ["policy"], folder, "warmup")
        return
    import numpy as np
    import torch

    from ahiq.nn.official import random_official_setup
    from measure import write_noisy_pairs

    torch.manual_seed(0)
    random_official_setup(8, folder)
    rows = [f"{dist.name},{ref.name}" for ref, dist, _ in write_noisy_pairs(folder, "", 288, 288, 2, 2,
                                                                           np.random.default_rng(0))]
    (folder / "pairs.csv").write_text("dist,ref\n" + "\n".join(rows) + "\n")


def row(case: str, way: str, times: list[float], alone: float | None = None) -> None:
    spread = f" (min {min(times):.2f}, max {max(times):.2f} over {len(times)} runs)" if len(times) > 1 else ""
    ratio = f", {statistics.median(times) / alone:.2f}x the policy's alone" if alone else ""
    print(f"{case} {way}: {statistics.median(times):.2f} s{spread}{ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=["demo", "scoring"], default=["demo", "scoring"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each job alone, each way")
    parser.add_argument("--threads", type=int, help="the policy's jobs with this many threads")
    parser.add_argument("--spin", type=int, nargs="*", default=[], help="also the policy with GOMP_SPINCOUNT=N")
    args = parser.parse_args()
    from measure import machine

    print(f"# {machine()}", flush=True)
    for case in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            prepare(case, folder)
            labels = {"policy": "policy", "defaults": "torch's defaults",
                      **{f"GOMP_SPINCOUNT={n}": f"GOMP_SPINCOUNT={n}" for n in args.spin}}
            threads = f", {args.threads} threads" if args.threads else ""
            alone: dict[str, list[float]] = {way: [] for way in labels}
            for repeat in range(args.repeats):
                for index, way in enumerate(alone):
                    alone[way] += run(case, [way], folder, f"alone_{repeat}_{index}", args.threads)
            base = statistics.median(alone["policy"])
            for way, label in labels.items():
                row(case, f"alone, {label}{threads if way != 'defaults' else ''}", alone[way],
                    None if way == "policy" else base)
            for index, (way, label) in enumerate(labels.items()):
                times = run(case, [way, way], folder, f"two_{index}", args.threads)
                row(case, f"two side by side, {label}{threads if way != 'defaults' else ''}", times, base)

if __name__ == "__main__":
    main()
