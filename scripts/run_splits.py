#!/usr/bin/env python
"""The paper's protocol on the classic datasets: train and test on K seeded reference-disjoint splits.

    python scripts/run_splits.py --opt options/live.yaml --splits 10 [key.path=value ...]

Split n trains experiment <name>_split<n> with data.split.seed=n (continuing it if it was interrupted;
a finished split is not retrained) and tests its best checkpoint on the split's test part. Prints and saves (to
checkpoints/<name>_splits/summary.md and summary.json) each split's SROCC and PLCC with their 95% intervals,
and their spread across the splits: median, mean +- std, lowest to highest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def summarise(rows: list[dict]) -> str:
    """Each split's SROCC and PLCC with its 95% interval (test.py's bootstrap within the split's test part), then
    their spread across the splits: median, mean +- standard deviation, lowest to highest."""
    from ahiq.engine.correlations import bracket, defined, shown

    lines = ["| split | SROCC [95% interval] | PLCC [95% interval] |", "|---|---|---|"]
    lines += [f"| {r['split']} | " + " | ".join(f"{shown(r[key])}{bracket(r.get(f'{key}_ci'))}" for key in ("srocc", "plcc"))
              + " |" for r in rows]
    # the spread over the splits where the statistic is defined
    values = {key: np.array([v for r in rows if (v := defined(r[key])) is not None]) for key in ("srocc", "plcc")}
    spread = {"median": lambda v: shown(np.median(v)), "mean +- std": lambda v: f"{shown(v.mean())} +- {shown(v.std())}",
              "lowest to highest": lambda v: f"{shown(v.min())} to {shown(v.max())}"}
    for label, cell in spread.items():
        lines.append(f"| {label} | " + " | ".join(cell(v) if len(v) else shown(None) for v in values.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opt", required=True)
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--checkpoints", default="checkpoints", help="folder of the experiment folders")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = parser.parse_args(argv)
    from ahiq.runtime.threads import prepare_environment

    prepare_environment()  # before torch loads
    from ahiq.engine.testing import run_test
    from ahiq.engine.training import train
    from ahiq.files import json_bytes, write_atomically
    from ahiq.options import load_options

    base = load_options(args.opt, args.overrides)
    rows = []
    for n in range(args.splits):
        name = f"{base['name']}_split{n}"
        opt = load_options(args.opt, [*args.overrides, f"name={name}", f"data.split.seed={n}", "train.resume=auto"])
        train(opt, args.checkpoints)  # with resume=auto a finished split trains no further
        metrics = run_test(opt, args.checkpoints)
        rows.append({"split": n, **{key: metrics.get(key) for key in ("srocc", "plcc", "krocc", "srocc_ci", "plcc_ci")}})
    table = summarise(rows)
    out = Path(args.checkpoints, f"{base['name']}_splits")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    write_atomically(out / "summary.json", json_bytes(rows))
    print(table)
    print(f"saved {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
