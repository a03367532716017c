#!/usr/bin/env python
"""The first GPU run, prepared: one command, one report, inside a time limit.

    python scripts/gpu_check.py                              # on one GPU: stops at 8 minutes (--minutes)
    python scripts/gpu_check.py --device cpu --quick         # the dry run (CI): small model, about a minute

It writes ``<out>.md`` and ``<out>.json`` (default ``gpu_check.md``/``.json``) with
- the device and the library versions;
- the outcome of the GPU tests (``pytest tests/test_cuda.py tests/test_fusion.py``; with ``--quick``
  ``tests/test_cuda.py`` alone: passed, failed, skipped);
- the evaluation and training rows of scripts/benchmark.py for ahiq in fp32 (NHWC, the default), TF32, bf16,
  NCHW and compiled (torch.compile), each against the official compute pattern in the same run: pairs per
  second, the speed-up, peak memory, and the largest difference of the scores (or losses) from the official
  pattern's and, for the other rows, from ahiq's fp32 row; and each fp32 and bf16 row's share of the GPU's own
  matmul at ViT-B/8's shapes, sampled before and after them ("of matmul").
Nothing is downloaded: the weights are random (speed and agreement do not depend on trained values). When
``--minutes`` run out, the step at hand is stopped and the report says so, with everything measured before.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--minutes", type=float, default=8.0, help="the time limit (default 8)")
    parser.add_argument("--quick", action="store_true", help="the small model and two crops: a dry run of every step "
                        "(about a minute on a 2-core CPU)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="report path without suffix")
    return parser


if __name__ == "__main__":
    arguments().parse_args()  # --help and mistyped arguments answer before torch loads

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import benchmark  # noqa: E402
from ahiq.files import json_bytes, write_atomically  # noqa: E402
from ahiq.runtime.device import Runtime, native_bf16, set_tf32  # noqa: E402
from measure import MatmulReference, environment  # noqa: E402

QUICK_SIZES = dict(img_size=64, vit_dim=32, vit_heads=2, cnn_width=8, fusion_hidden=16, head_dim=16, head_hidden=32)


class TimeUp(BaseException):
    """The time limit was reached. Not an Exception: code that catches and handles errors (torch.compile's
    fallbacks among them) must not swallow it."""


def runtimes(quick: bool) -> dict[str, Runtime]:
    # The dry run compiles with dynamo's eager backend: the same capture, none of inductor's minutes.
    return {"fp32": Runtime(), "tf32": Runtime(tf32=True), "bf16": Runtime(precision="bf16"),
            "nchw": Runtime(channels_last=False), "compiled": Runtime(compile="eager" if quick else True)}


def gpu_tests(deadline: float, quick: bool) -> dict:
    """pytest on the GPU tests (skipped without CUDA), within what is left of the time."""
    files = ["tests/test_cuda.py"] if quick else ["tests/test_cuda.py", "tests/test_fusion.py"]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command[2:]), "outcome": "stopped at the time limit"}
    summary = next((line for line in reversed(done.stdout.strip().splitlines()) if " in " in line), "")
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"command": " ".join(command[2:]), "exit": done.returncode, "outcome": summary.strip("= "),
            "failures": failures}


def write(report: dict, out: Path) -> None:
    write_atomically(out.with_suffix(".json"), json_bytes(report))
    env, tests = report["environment"], report.get("tests", {})
    lines = [f"# GPU check, {report['started']}", "",
             "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in env.items()], "",
             f"Finished: {'yes' if report['complete'] else 'no, stopped during ' + report['stopped_during']} "
             f"({report['seconds']:.0f} s of {report['limit_seconds']:.0f}).", "",
             "## GPU tests", "", f"`{tests.get('command', 'not run')}`: {tests.get('outcome', 'not run')}", "",
             *[f"- {line}" for line in tests.get("failures", [])], "",
             "## Against the official pattern", "",
             "| case | official pairs/s | ahiq pairs/s | speed-up | max abs diff (vs official) | vs ahiq fp32 | "
             "peak MiB official / ahiq |", "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if "speedup" not in row:
            continue
        lines.append(f"| {row['case']} | {row['reference_pairs_per_s']:.3f} | {row['ahiq_pairs_per_s']:.3f} | "
                     f"{row['speedup']:.2f}x | {row.get('max_diff', float('nan')):.2e} | "
                     f"{row.get('max_diff_vs_fp32', float('nan')):.2e} | "
                     f"{row['peak_reference_mib']:.0f} / {row['peak_ahiq_mib']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; for a dry run use --device cpu --quick", file=sys.stderr)
        return 2
    try:  # the report's folder before the minutes of work, not after them
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").touch()
    except OSError as exc:
        print(f"error: --out {args.out}: cannot write the report there ({exc.strerror}); choose another path",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        set_tf32(False)  # the reference rows in strict fp32; the tf32 row turns it on for itself
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "limit_seconds": 60 * args.minutes,
              "environment": environment(device), "rows": [], "complete": False, "stopped_during": ""}
    sizes = QUICK_SIZES if args.quick else None
    steps = [("GPU tests", lambda: report.update(tests=gpu_tests(deadline, args.quick))),
             ("evaluation", lambda: benchmark.eval_suite(device, 2 if args.quick else 16, 2 if args.quick else 20,
                                                         runtimes(args.quick), sizes, rows=report["rows"])),
             ("training", lambda: benchmark.train_suite(device, 1 if args.quick else 3, runtimes(args.quick), sizes,
                                                        largest=False, rows=report["rows"])),
             ("matmul", lambda: (matmul.sample("after"), benchmark.of_matmul(report["rows"], matmul)))]
    matmul = MatmulReference(device, native_bf16(device))
    matmul.sample("before")

    def time_up(signum, frame):
        raise TimeUp

    signal.signal(signal.SIGALRM, time_up)
    # Every second from the limit on, until cancelled: code that catches and handles errors can swallow one.
    signal.setitimer(signal.ITIMER_REAL, max(1e-3, deadline - time.monotonic()), 1.0)
    try:
        for name, step in steps:
            report["stopped_during"] = name
            step()
            report["seconds"] = time.monotonic() - start
            write(report, args.out)  # what is measured so far, after every step
        report["complete"], report["stopped_during"] = True, ""
    except TimeUp:
        signal.setitimer(signal.ITIMER_REAL, 0)
        print(f"# the time limit ({args.minutes} min) was reached during {report['stopped_during']}", flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        report["seconds"] = time.monotonic() - start
        write(report, args.out)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
