#!/usr/bin/env python
"""The paper's protocol on the classic datasets: train and test on K seeded reference-disjoint splits.

    python scripts/run_splits.py --opt options/live.yaml --splits 10 [key.path=value ...]

Split n trains experiment <name>_split<n> with data.split.seed=n (continuing it if it was interrupted;
a finished split is not retrained) and tests its best checkpoint on the split's test part. Prints and saves (to
checkpoints/<name>_splits/summary.md and summary.json) each split's SROCC and PLCC, their median and
their mean +- std.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def summarise(rows: list[dict]) -> str:
    lines = ["| split | SROCC | PLCC |", "|---|---|---|"]
    lines += [f"| {r['split']} | {r['srocc']:.4f} | {r['plcc']:.4f} |" for r in rows]
    for label, fn in (("median", np.median), ("mean", np.mean)):
        s, p = fn([r["srocc"] for r in rows]), fn([r["plcc"] for r in rows])
        if label == "mean":
            lines.append(f"| mean +- std | {s:.4f} +- {np.std([r['srocc'] for r in rows]):.4f} | "
                         f"{p:.4f} +- {np.std([r['plcc'] for r in rows]):.4f} |")
        else:
            lines.append(f"| median | {s:.4f} | {p:.4f} |")
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
    from ahiq.options import load_options

    base = load_options(args.opt, args.overrides)
    rows = []
    for n in range(args.splits):
        name = f"{base['name']}_split{n}"
        opt = load_options(args.opt, [*args.overrides, f"name={name}", f"data.split.seed={n}", "train.resume=auto"])
        train(opt, args.checkpoints)  # with resume=auto a finished split trains no further
        metrics = run_test(opt, args.checkpoints)
        rows.append({"split": n, "srocc": metrics["srocc"], "plcc": metrics["plcc"], "krocc": metrics["krocc"]})
    table = summarise(rows)
    out = Path(args.checkpoints, f"{base['name']}_splits")
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print(table)
    print(f"saved {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
