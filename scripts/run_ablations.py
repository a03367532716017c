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
before the first row trains, and so is every option the rows would not honour (model.fusion, model.cnn,
model.pooling, model.patch_size, train.resume, test.output and test.checkpoint: each row sets them itself).
One run at a time takes a table (a second is refused at once); a row shared with another table's run waits
for it. Ctrl-C or SIGTERM stops every row as train.py stops (latest.pth written); the same command continues.
Exit status 1 when a row failed (its cell in the table says why), 2 for a problem found before any row
trained, 130 (Ctrl-C) or 143 (SIGTERM) when stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ahiq.files import json_bytes, release_and_remove, take_lock, waiting_for_lock, write_atomically  # noqa: E402
from ahiq.messages import create_folder, for_the_user  # noqa: E402
from ahiq.nn.downloads import DownloadError  # noqa: E402
from ahiq.engine.correlations import shown  # noqa: E402
from ahiq.options import OptionsError, load_options  # noqa: E402
from ahiq.registry.variants import AHIQ, TABLES, AblationRow, AblationTable  # noqa: E402

CHECKPOINTS = Path("checkpoints")  # where train.py and test.py keep the experiments: in the current folder


def experiment_name(row: AblationRow, base: str) -> str:
    """<base>_<variant>: the same variant has the same experiment in every table."""
    return f"{base}_{row.slug}"


def overrides(row: AblationRow) -> list[str]:
    """The model options of the row: AHIQ's, one changed (the paper's ablations are of ViT-B/8 AHIQ on PIPAL),
    and what the row must set whatever the options say."""
    fixed = {key: value for key, value, _ in row.fixed}
    return [f"model.{key}={value}" for key, value in {**AHIQ, **row.variant, **fixed}.items()]


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


def row_options(args, row: AblationRow, threads: int | None) -> list[str]:
    """The command-line options of the row's train.py and test.py."""
    return ["--opt", str(args.opt), *args.overrides, *overrides(row), f"name={experiment_name(row, args.base)}",
            "train.resume=auto", *([f"runtime.threads={threads}"] if threads else [])]


class Children:
    """The rows' train.py and test.py processes, each in a session of its own (a Ctrl-C at the terminal reaches
    the runner alone), and the stop the runner passes on to them: each row's run stops as train.py stops, with
    latest.pth written, and no row starts after it."""

    def __init__(self):
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopped = 0  # the signal that stopped the runner

    def run(self, command: list[str], out) -> int | None:
        """The command's exit status; None when the runner was stopped before it started."""
        with self.lock:
            if self.stopped:
                return None
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.running.add(child)
        try:
            return child.wait()
        finally:
            with self.lock:
                self.running.discard(child)

    def stop(self, signum: int, frame=None) -> None:
        """A signal handler: pass the signal on to every running child (a second one too: train.py then stops
        at once)."""
        with self.lock:
            self.stopped = self.stopped or signum
            for child in self.running:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)


def run_row(args, row: AblationRow, threads: int | None, log_dir: Path, children: Children) -> dict:
    """Train and test one row (or take its earlier result): {"plcc", "srocc", ...} or {"submission": path}, or
    {"failed": what}, or {"stopped": signal}. One run at a time trains a row: a row shared with another table
    being run waits for it (then takes its result)."""
    try:
        return _run_row(args, row, threads, log_dir, children)
    except OSError as exc:  # its log or record could not be written (a full disk): the row's cell says so
        what = f"{exc.filename or 'a file'} could not be written ({exc.strerror or exc})"
        say(f"{experiment_name(row, args.base)}: {what}")
        return {"failed": what}


def _run_row(args, row: AblationRow, threads: int | None, log_dir: Path, children: Children) -> dict:
    experiment = CHECKPOINTS / experiment_name(row, args.base)
    options = load_options(args.opt, row_options(args, row, threads)[2:])
    if children.stopped:  # rows waiting for a place in the pool when the runner was stopped
        return {"stopped": children.stopped}
    with waiting_for_lock(CHECKPOINTS / f".{experiment.name}.ablation.lock",
                          f"{experiment.name}: waiting for another run_ablations.py training this row"):
        kept = _recorded(experiment / "ablation.json", options)
        if kept is not None:
            say(f"{experiment.name}: trained and tested before with these options, not run again")
            return kept
        log = log_dir / f"{experiment.name}.log"
        say(f"{experiment.name}: training and testing (output in {log})")
        with open(log, "a") as out:
            for script in ("train.py", "test.py"):
                command = [sys.executable, str(ROOT / script), *row_options(args, row, threads)]
                out.write(f"$ {' '.join(command)}\n")
                out.flush()
                code = children.run(command, out)
                if children.stopped:
                    return {"stopped": children.stopped}
                if code:
                    last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
                    what = f"{script} exited with {code}: {last[0] if last else ''}"
                    say(f"{experiment.name}: {what} (see {log})")
                    return {"failed": what}
        result = _test_result(experiment)
        if "failed" not in result:
            write_atomically(experiment / "ablation.json",
                             json_bytes({"options": _comparable(options), "result": result}))
        say(f"{experiment.name}: done")
        return result


def _recorded(path: Path, options: dict) -> dict | None:
    """The row's result kept in its ablation.json when it was trained and tested with these options; None
    otherwise, a damaged file included (the row then runs again: train.py continues it)."""
    if not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
        result = kept["result"]
        if kept["options"] != _comparable(options):
            return None
        if "submission" in result or all(isinstance(result[k], (int, float, type(None))) for k in ("plcc", "srocc", "main")):
            return result  # a statistic undefined for the row's predictions (null) is a result too
        raise ValueError("its result is incomplete")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        say(f"{path} cannot be read ({type(exc).__name__}: {exc}): running its row again")
        return None


def _comparable(options: dict) -> dict:
    """The options that decide a row's result (JSON round trip: what ablation.json holds); not the threads,
    which change with --jobs."""
    kept = json.loads(json.dumps(options))
    kept["runtime"].pop("threads", None)
    return kept


def _test_result(experiment: Path) -> dict:
    """What the row's test.py wrote into its own folder, experiment/test."""
    out = experiment / "test"
    if (out / "metrics.json").is_file():
        try:
            metrics = json.loads((out / "metrics.json").read_text())
            return {key: metrics[key] for key in ("plcc", "srocc", "krocc", "rmse", "main", "n")}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return {"failed": f"{out / 'metrics.json'} cannot be read ({type(exc).__name__})"}
    if (out / "submission.zip").is_file():
        return {"submission": str(out / "submission.zip")}  # an unlabelled test set: an NTIRE submission
    return {"failed": f"test.py wrote neither metrics.json nor submission.zip in {out}"}


def rendered(table: AblationTable, results: list[dict], base: str, tested_on: str) -> tuple[str, str]:
    """The table in Markdown and CSV: the paper's columns, its figures ("--" for a row it does not have), then
    ours."""
    rows = table.rows()
    paper = ["paper PLCC", "paper SROCC", "paper main"][:max(len(row.paper) for row in rows)]
    header = [*table.columns, *paper, "ours PLCC", "ours SROCC", "ours main", "experiment"]
    lines = []
    for row, result in zip(rows, results):
        figures = [f"{value:.3f}" for value in row.paper] + ["--"] * (len(paper) - len(row.paper))
        if "plcc" in result:
            ours = [shown(result[key]) for key in ("plcc", "srocc", "main")]
        else:
            ours = [result.get("failed", f"submission {result.get('submission')}"), "", ""]
        lines.append([*row.cells, *figures, *ours, experiment_name(row, base)])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *lines])
    markdown = [f"{table.title}. Paper: NTIRE 2022 test set; ours: {tested_on}.", "",
                "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(markdown) + "\n", text.getvalue()


def check_table(args, base: dict, rows: list[dict]) -> None:
    """Every option the rows cannot honour, and every row that cannot run, before the first row trains. The
    rows set the model options they vary (any given for them would be replaced), continue where they stopped
    (train.resume=auto), and test the model they trained into their own folder."""
    for key in AHIQ:
        given = [text for text in args.overrides if text.split("=", 1)[0].strip() == f"model.{key}"]
        if given or base["model"][key] != AHIQ[key]:
            where = f"the override {given[-1]!r}" if given else f"{args.opt}: model.{key} {base['model'][key]!r}"
            raise OptionsError(f"{where}: every row of Table {args.table} sets model.{key} itself (AHIQ's "
                               f"{AHIQ[key]!r}, one change per row); leave it out")
    refused = {"train.resume": (base["train"]["resume"] not in (None, "auto"), "each row continues where it "
                                "stopped (train.resume=auto)"),
               "test.output": (base["test"]["output"] is not None, "each row is tested into its own folder, "
                               "checkpoints/<experiment>/test"),
               "test.checkpoint": (base["test"]["checkpoint"] not in ("best", "latest"), "each row tests the model "
                                   "it trained (best or latest)")}
    for key, (wrong, why) in refused.items():
        if wrong:
            group, leaf = key.split(".")
            raise OptionsError(f"{key} {base[group][leaf]!r} (from {args.opt} or its overrides): {why}; leave it out")


def table_folder(out: Path) -> None:
    """Create the table's folder and its logs/, or one line naming the file in the way."""
    for folder in (*reversed(out.parents), out):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is a file where the table's folder {out} goes: move it away, then run again")
    create_folder(out / "logs", "the table's folder")
    try:
        tempfile.NamedTemporaryFile(dir=out / "logs").close()
    except OSError as exc:
        raise ValueError(f"cannot write in the table's folder {out / 'logs'} ({exc.strerror or exc})") from None


def main(argv=None) -> int:
    args = arguments().parse_args(argv)
    if args.jobs < 1:
        arguments().error(f"--jobs must be at least 1, got {args.jobs}")
    table = TABLES[args.table]
    try:
        base = load_options(args.opt, args.overrides)
        args.base = base["name"]
        # every row's options, and the pretrained weights of them all, before the first row trains
        rows = [load_options(args.opt, row_options(args, row, None)[2:]) for row in table.rows()]
        check_table(args, base, rows)
        from ahiq.engine.training import checked_parts
        from ahiq.nn.downloads import locate
        from ahiq.nn.pretrained import backbone_files

        checked_parts(base)  # the labels and every image, as each row's train.py will check them
        wanted = {file: None for opt in rows for file in backbone_files(opt["model"]).values()}
        locate(list(wanted), base["model"]["weights"])
        out = CHECKPOINTS / f"{args.base}_table{args.table}"
        table_folder(out)
        lock = take_lock(out / ".lock", f"Table {args.table}'s folder {out}", "run another --table meanwhile")
    except (OptionsError, FileNotFoundError, ValueError, DownloadError, OSError) as exc:  # the data's errors too
        print(f"error: {for_the_user(exc)}", file=sys.stderr)
        return 2
    try:
        return _run_table(args, table, base, out)
    finally:
        release_and_remove(lock, out / ".lock")


def _run_table(args, table: AblationTable, base: dict, out: Path) -> int:
    for row in table.rows():
        for key, value, why in row.fixed:
            if base["model"][key] != value:
                say(f"{experiment_name(row, args.base)}: model.{key} {value}, not {base['model'][key]}: {why}")
    threads = None
    if args.jobs > 1 and base["runtime"]["threads"] is None:
        from ahiq.runtime.threads import usable_cpus

        threads = max(1, usable_cpus()[0] // args.jobs)
    children = Children()
    previous = {s: signal.signal(s, children.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda row: run_row(args, row, threads, out / "logs", children), table.rows()))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if children.stopped:
        print(f"stopped by {signal.Signals(children.stopped).name}: every finished row is kept (its ablation.json), "
              f"an interrupted one continues; run the same command again to complete the table", file=sys.stderr)
        return 128 + children.stopped
    data = base["data"]
    test = data["test"] or data["val"] or data  # the test part as ahiq.data.parts takes it
    markdown, rows = rendered(table, results, args.base,
                              f"the test part of {args.opt} ({test['dataset']} at {test['root']})")
    try:
        write_atomically(out / "table.md", markdown.encode())
        write_atomically(out / "table.csv", rows.encode())
    except OSError as exc:
        print(f"error: cannot write the table into {out} ({exc.strerror or exc}); every row's result is kept (its "
              f"ablation.json): run the same command again once the folder can be written", file=sys.stderr)
        return 2
    print(markdown + f"\nsaved {out / 'table.md'} and {out / 'table.csv'}")
    return 1 if any("failed" in result for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
