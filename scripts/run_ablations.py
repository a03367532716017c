#!/usr/bin/env python
"""The paper's ablations, one command per table: every variant of Table 6 (fusion), 7 (CNN backbone) or 8
(pooling) trained and tested, and the table written in the paper's layout with the paper's figures beside ours.

    python scripts/run_ablations.py --table 6 --opt options/pipal.yaml data.root=/data/PIPAL
    python scripts/run_ablations.py --table 8 --opt options/demo.yaml --jobs 2     # the CPU demo, in minutes

Each row is an experiment <name>_<variant> (the row AHIQ is <name>_ahiq, shared by the three tables) trained
by train.py with train.resume=auto, so an interrupted row continues where it stopped, then tested by test.py
on the option file's test part. A row trained and tested with the same options before is not run again (its
result is kept in the experiment's ablation.json). --jobs N runs N rows at once, each in its own processes
(on a CPU each with its share of the threads). The table goes to checkpoints/<name>_table<N>/table.md and
table.csv, and is printed; each row's output to logs/<experiment>.log beside them. Every row's options and
the pretrained weights every row needs are checked (fetched where they are missing, as train.py would)
before the first row trains. Exit status 1 when a row failed (its cell in the table says why), 2 for a
problem found before any row trained.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ahiq.messages import for_the_user  # noqa: E402
from ahiq.options import OptionsError, load_options  # noqa: E402

CHECKPOINTS = Path("checkpoints")  # where train.py and test.py keep the experiments: in the current folder
# What every row sets: the paper's ablations are of ViT-B/8 AHIQ on PIPAL, one choice changed per row.
AHIQ = {"fusion": "deform+concat", "cnn": "resnet50", "pooling": "patch", "patch_size": 8}


@dataclass(frozen=True)
class Row:
    cells: tuple[str, ...]        # the paper's first columns
    variant: dict                 # the model options that differ from AHIQ
    paper: tuple[float, ...]      # the paper's PLCC, SROCC and, where it gives it, main score (NTIRE 2022 test set)

    @property
    def name(self) -> str:
        """The variant's name: ``ahiq``, or what it changes (``concat``, ``resnet101``, ``vit-b16`` ...)."""
        names = {"fusion": {"concat": "concat", "cnn": "cnn-only", "vit": "vit-only"}, "patch_size": {16: "vit-b16"}}
        return "_".join(names.get(key, {}).get(value, str(value)) for key, value in self.variant.items()) or "ahiq"

    def experiment(self, base: str) -> str:
        """<base>_<variant>: the same variant has the same experiment in every table."""
        return f"{base}_{self.name}"

    def overrides(self) -> list[str]:
        return [f"model.{key}={value}" for key, value in {**AHIQ, **self.variant}.items()]


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[Row, ...]


TABLES = {
    6: Table("Table 6: feature fusion (CNN: ResNet50, ViT: ViT-B/8)", ("No", "CNN", "ViT", "fusion"), (
        Row(("1", "yes", "yes", "deform+concat"), {}, (0.823, 0.813)),
        Row(("2", "yes", "yes", "concat"), {"fusion": "concat"}, (0.810, 0.799)),
        Row(("3", "yes", "", ""), {"fusion": "cnn"}, (0.792, 0.789)),
        Row(("4", "", "yes", ""), {"fusion": "vit"}, (0.799, 0.788)),
    )),
    7: Table("Table 7: backbones", ("CNN", "ViT"), (
        Row(("ResNet50", "ViT-B/8"), {}, (0.823, 0.813, 1.636)),
        Row(("ResNet101", "ViT-B/8"), {"cnn": "resnet101"}, (0.802, 0.788, 1.590)),
        Row(("ResNet152", "ViT-B/8"), {"cnn": "resnet152"}, (0.807, 0.793, 1.600)),
        Row(("HRNet (W18)", "ViT-B/8"), {"cnn": "hrnet_w18"}, (0.806, 0.796, 1.601)),
        Row(("InceptionResNetV2", "ViT-B/8"), {"cnn": "inception_resnet_v2"}, (0.806, 0.793, 1.599)),
        Row(("ResNet50", "ViT-B/16"), {"patch_size": 16}, (0.811, 0.803, 1.614)),
    )),
    8: Table("Table 8: pooling", ("pooling",), (
        Row(("patch",), {}, (0.823, 0.813, 1.636)),
        Row(("spatial",), {"pooling": "spatial"}, (0.794, 0.795, 1.589)),
        Row(("patch + spatial",), {"pooling": "patch+spatial"}, (0.801, 0.791, 1.593)),
    )),
}


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=int, required=True, choices=sorted(TABLES))
    parser.add_argument("--opt", required=True, type=Path, help="the option file every row starts from")
    parser.add_argument("--jobs", type=int, default=1, help="rows trained at once (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="options for every row")
    return parser


def say(line: str) -> None:
    """One line of progress, whole: rows run in threads."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def row_options(args, row: Row, threads: int | None) -> list[str]:
    """The command-line options of the row's train.py and test.py."""
    return ["--opt", str(args.opt), *args.overrides, *row.overrides(), f"name={row.experiment(args.base)}",
            "train.resume=auto", *([f"runtime.threads={threads}"] if threads else [])]


def run_row(args, row: Row, threads: int | None, log_dir: Path) -> dict:
    """Train and test one row (or take its earlier result): {"plcc", "srocc", ...} or {"submission": path}, or
    {"failed": what}."""
    experiment = CHECKPOINTS / row.experiment(args.base)
    options = load_options(args.opt, row_options(args, row, threads)[2:])
    record = experiment / "ablation.json"
    if record.is_file():
        kept = json.loads(record.read_text())
        if kept.get("options") == _comparable(options):
            say(f"{experiment.name}: trained and tested before with these options, not run again")
            return kept["result"]
    log = log_dir / f"{experiment.name}.log"
    say(f"{experiment.name}: training and testing (output in {log})")
    with open(log, "a") as out:
        for script in ("train.py", "test.py"):
            command = [sys.executable, str(ROOT / script), *row_options(args, row, threads)]
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
            if done.returncode:
                last = [line for line in log.read_text().splitlines() if line.strip()][-1:]
                what = f"{script} exited with {done.returncode}: {last[0] if last else ''}"
                say(f"{experiment.name}: {what} (see {log})")
                return {"failed": what}
    result = _test_result(options, experiment)
    record.write_text(json.dumps({"options": _comparable(options), "result": result}, indent=1))
    say(f"{experiment.name}: done")
    return result


def _comparable(options: dict) -> dict:
    """The options that decide a row's result (JSON round trip: what ablation.json holds); not the threads,
    which change with --jobs."""
    kept = json.loads(json.dumps(options))
    kept["runtime"].pop("threads", None)
    return kept


def _test_result(options: dict, experiment: Path) -> dict:
    out = Path(options["test"]["output"]) if options["test"]["output"] else experiment / "test"
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        return {key: metrics[key] for key in ("plcc", "srocc", "krocc", "rmse", "main", "n")}
    return {"submission": str(out / "submission.zip")}  # an unlabelled test set: an NTIRE submission


def rendered(table: Table, results: list[dict], base: str, tested_on: str) -> tuple[str, str]:
    """The table in Markdown and CSV: the paper's columns, its figures, then ours."""
    paper = ["paper PLCC", "paper SROCC", "paper main"][:len(table.rows[0].paper)]
    header = [*table.columns, *paper, "ours PLCC", "ours SROCC", "ours main", "experiment"]
    lines = []
    for row, result in zip(table.rows, results):
        figures = [f"{value:.3f}" for value in row.paper]
        if "plcc" in result:
            ours = [f"{result['plcc']:.4f}", f"{result['srocc']:.4f}", f"{result['main']:.4f}"]
        else:
            ours = [result.get("failed", f"submission {result.get('submission')}"), "", ""]
        lines.append([*row.cells, *figures, *ours, row.experiment(base)])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *lines])
    markdown = [f"{table.title}. Paper: NTIRE 2022 test set; ours: {tested_on}.", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(markdown) + "\n", text.getvalue()


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    if args.jobs < 1:
        arguments().error(f"--jobs must be at least 1, got {args.jobs}")
    table = TABLES[args.table]
    try:
        base = load_options(args.opt, args.overrides)
        args.base = base["name"]
        # every row's options, and the pretrained weights of them all, before the first row trains
        rows = [load_options(args.opt, row_options(args, row, None)[2:]) for row in table.rows]
        from ahiq.nn.downloads import DownloadError, locate
        from ahiq.nn.model import backbone_files

        wanted = {file: None for opt in rows for file in backbone_files(opt["model"]).values()}
        locate(list(wanted), base["model"]["weights"])
    except (OptionsError, FileNotFoundError, ValueError, DownloadError) as exc:
        print(f"error: {for_the_user(exc)}", file=sys.stderr)
        return 2
    threads = None
    if args.jobs > 1 and base["runtime"]["threads"] is None:
        from ahiq.runtime.threads import usable_cpus

        threads = max(1, usable_cpus()[0] // args.jobs)
    out = CHECKPOINTS / f"{args.base}_table{args.table}"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda row: run_row(args, row, threads, out / "logs"), table.rows))
    data = base["data"]
    test = data["test"] or data["val"] or data  # the test part as ahiq.data.parts takes it
    markdown, rows = rendered(table, results, args.base,
                              f"the test part of {args.opt} ({test['dataset']} at {test['root']})")
    (out / "table.md").write_text(markdown)
    (out / "table.csv").write_text(rows)
    print(markdown + f"\nsaved {out / 'table.md'} and {out / 'table.csv'}")
    return 1 if any("failed" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
