"""Scores kept as they are computed. Each process appends the rows of every reference it finishes to its
own journal next to the output (``<out>.part<rank>``), flushed and synced, so a killed job loses at most
the reference it was on; ``--resume`` reads the journals back; at the end the output CSV is written from
them in the order of the pairs, atomically, and the journals are removed."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ahiq.files import WriteError, json_bytes, write_atomically

HEADER = ("dist", "ref", "score")


def csv_row(dist: str, ref: str, score: float) -> list[str]:
    return [dist, ref, f"{score:.6f}"]


def journal_paths(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.glob(out.name + ".part*") if p.name[len(out.name) + 5:].isdigit())


def check_writable(out: Path) -> None:
    """Fail before the first pair, not after the last, when ``out`` cannot be written."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name, e.g. {out / 'scores.csv'}")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist; create it first")
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".check"):
            pass
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None


class Journal:
    """This process's journal: ``add`` appends rows durably."""

    def __init__(self, out: Path, rank: int):
        self.path = out.with_name(f"{out.name}.part{rank}")
        self.file = open(self.path, "a", newline="", encoding="utf-8")

    def add(self, rows: Iterable[Sequence[str]]) -> None:
        text = io.StringIO()
        csv.writer(text).writerows(rows)
        try:
            self.file.write(text.getvalue())
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:  # a row cut short has no newline: read_journals leaves it out
            raise WriteError(exc.errno, f"cannot write {self.path} ({exc.strerror or exc}): the pairs scored before "
                                        f"are kept in it; free space, then run the same command again (python -m ahiq "
                                        f"score: with --resume)") from None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_journals(out: Path) -> dict[tuple[str, str], str]:
    """(dist, ref) -> the score's text, from every journal of ``out``. A last line cut short by a kill
    (no newline at its end) is ignored: that pair is scored again."""
    scores = {}
    for path in journal_paths(out):
        text = path.read_text(encoding="utf-8")
        complete = text[:text.rfind("\n") + 1]
        for fields in csv.reader(io.StringIO(complete)):
            if len(fields) == 3:
                scores[(fields[0], fields[1])] = fields[2]
    return scores


def settings_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.settings.json")


def record_settings(out: Path, settings: dict) -> None:
    """Keep what decides a score (checkpoint digests, crops, seed, precision...) beside the journals."""
    write_atomically(settings_path(out), json_bytes(settings))


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to resume the journals of ``out`` with settings other than those they were scored with: the CSV
    would mix scores of different models or crops."""
    path = settings_path(out)
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"--resume: {path} (the settings the journals of {out} were scored with) is missing or "
                         f"unreadable, so they cannot be continued safely; delete "
                         f"{' '.join(map(str, journal_paths(out)))} and score again") from None
    differ = [f"{key} {recorded.get(key)!r} then, {settings.get(key)!r} now" for key in sorted({*recorded, *settings})
              if recorded.get(key) != settings.get(key)]
    if differ:
        raise ValueError(f"--resume: the journals of {out} were scored with other settings ({'; '.join(differ)}); "
                         f"resume with the same settings, or delete {' '.join(map(str, journal_paths(out)))} "
                         f"{path} to start again")


def count_rows(out: Path) -> int:
    """How many rows the journals hold (for a progress bar over several processes)."""
    return sum(p.read_bytes().count(b"\n") for p in journal_paths(out))


def finish(out: Path, pairs: Sequence) -> None:
    """Write ``out`` (dist,ref,score in the order of ``pairs``) from the journals, atomically, then remove
    the journals."""
    scores = read_journals(out)
    missing = [p.dist for p in pairs if (p.dist, p.ref) not in scores]
    if missing:
        raise ValueError(f"the journals of {out} lack {len(missing)} pairs (first: {missing[0]}); run again with "
                         f"--resume to score them")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(HEADER)
    writer.writerows([p.dist, p.ref, scores[(p.dist, p.ref)]] for p in pairs)
    write_atomically(out, text.getvalue().encode("utf-8"))
    for path in journal_paths(out):
        path.unlink()
    settings_path(out).unlink(missing_ok=True)


def read_scores(out: Path, pairs: Sequence) -> np.ndarray:
    """The scores of ``pairs``, in their order, from the finished CSV ``out`` (``finish``'s)."""
    with open(out, newline="", encoding="utf-8") as f:
        scores = {(row["dist"], row["ref"]): float(row["score"]) for row in csv.DictReader(f)}
    missing = [p.dist for p in pairs if (p.dist, p.ref) not in scores]
    if missing:
        raise ValueError(f"{out} lacks the scores of {len(missing)} pairs (first: {missing[0]}); delete it and run again")
    return np.array([scores[(p.dist, p.ref)] for p in pairs])
