"""Scoring to a CSV, kept as it is computed, or to standard output; the quality-map files beside. The same for
the PyTorch scorer and the ONNX one: no torch is imported here (torchrun's barrier only under torchrun)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ahiq.data import Pairs
from ahiq.data.pairs import reference_shares
from ahiq.files import release_and_remove, take_lock
from ahiq.messages import create_folder
from ahiq.runtime.job import Job
from ahiq.runtime.signals import StopSignals, Stopped
from ahiq.scoring.journal import (Journal, check_settings, check_writable, count_rows, csv_row, finish, journal_paths,
                                  read_journals, record_settings)
from ahiq.scoring.maps import map_file_stems, write_panels


def score_to_file(scorer, pairs: Pairs, out: Path | None, job: Job = Job(), resume: bool = False,
                  progress: bool = False, maps: Path | None = None, heading: str | None = None) -> None:
    """Score ``pairs`` into the CSV ``out`` (dist,ref,score in the pairs' order), or print ``name,score``
    lines as references finish when ``out`` is None. ``scorer``: an ahiq.Scorer or an
    ahiq.scoring.onnx_scorer.OnnxScorer (``score_pairs``, ``settings``, ``check_maps``).

    Nothing is held only in memory: each process journals every reference it finishes (ahiq.scoring.journal), so a
    job killed at pair 90,000 keeps them and ``resume`` scores only the rest. Under torchrun the processes
    share the pairs by reference and rank 0 writes ``out`` from all journals. SIGTERM or SIGINT stops at
    the next reference with everything scored kept (Stopped). ``maps``: a folder that gets each pair's
    quality maps (``<name>.npz``, saved as the pair is scored) and, at the end, its panel (``<name>.png``).
    ``heading``: printed (rank 0, standard error) once everything is checked, as scoring begins."""
    if maps is not None:  # before anything is scored
        scorer.check_maps()
    saver = _map_saver(scorer, pairs, maps)

    def announce():
        if heading and job.main:
            print(heading, file=sys.stderr, flush=True)
    if out is None:
        if job.world > 1 or resume:
            raise ValueError("give --out: " + ("the processes' rows go to one file" if job.world > 1
                                               else "--resume continues the file of an earlier run"))

        printed = []

        def show(indices, scores):
            print("".join(f"{pairs[i].name},{value:.6f}\n" for i, value in zip(indices, scores)), end="", flush=True)
            printed.extend(indices)
            if signals.requested:
                raise Stopped(f"stopped by {signals.name} after {len(printed)} of {len(pairs)} pairs (printed above)",
                              signals.requested)

        announce()
        with StopSignals() as signals:
            scorer.score_pairs(pairs, progress, on_reference=show, on_maps=saver(pairs))
        if maps is not None:
            write_panels(maps, pairs)
        return
    check_writable(out)
    # Two runs on one output would take each other's journals for their own: the second is refused.
    lock_path = out.with_name(f".{out.name}.lock")
    lock = take_lock(lock_path, f"--out {out}", "choose another --out") if job.main else None
    try:
        _score_to_journals(scorer, pairs, out, job, resume, progress, maps, saver, announce)
    finally:
        if lock is not None:
            release_and_remove(lock, lock_path)


def _score_to_journals(scorer, pairs: Pairs, out: Path, job: Job, resume: bool, progress: bool,
                       maps: Path | None, saver, announce) -> None:
    leftovers = journal_paths(out)
    if leftovers and not resume:
        raise ValueError(f"{leftovers[0]} holds the scores of an unfinished run: continue it with --resume, or "
                         f"delete {' '.join(map(str, leftovers))}")
    settings = scorer.settings()
    if leftovers:
        check_settings(out, settings)
    elif job.main:
        record_settings(out, settings)
    announce()
    done = read_journals(out) if resume else {}
    todo = Pairs([p for p in pairs if (p.dist, p.ref) not in done], pairs.higher_is_better, pairs.dataset)
    if done and job.main:
        print(f"resuming: {len(pairs) - len(todo)} of {len(pairs)} pairs already scored", file=sys.stderr)
    if job.world > 1:
        barrier()  # every process has read the journals before any process appends to them
    mine = Pairs([todo[i] for i in reference_shares(todo, job.world)[job.rank]])
    bar = None
    if progress and job.main:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), initial=count_rows(out), desc="score", unit="pair", dynamic_ncols=True,
                   disable=None)

    def global_progress():  # every process's journal: the count rank 0 shows is the job's
        if bar is not None:
            bar.update(count_rows(out) - bar.n)

    with StopSignals() as signals, Journal(out, job.rank) as journal:
        def stop_if_asked():
            if signals.requested:
                raise Stopped(f"stopped by {signals.name}: the pairs scored so far are kept in {journal.path}; run "
                              f"the same command with --resume to score the rest", signals.requested)

        def keep(indices, scores):
            journal.add(csv_row(mine[i].dist, mine[i].ref, value) for i, value in zip(indices, scores))
            global_progress()
            stop_if_asked()

        scorer.score_pairs(mine, on_reference=keep, on_maps=saver(mine))
        if job.world > 1:
            while bar is not None and count_rows(out) < len(pairs):  # the other processes' progress
                stop_if_asked()
                global_progress()
                time.sleep(0.5)
            barrier()  # every process's journal is complete
    if bar is not None:
        global_progress()
        bar.close()
    if job.main:
        finish(out, pairs)
        if maps is not None:
            write_panels(maps, pairs)


def check_outputs(out: Path | None, maps: Path | None) -> None:
    """The CSV and the maps folder can be written (the folder is created): checked before any model is
    loaded or downloaded, and again before the first pair."""
    if out is not None:
        check_writable(out)
    if maps is not None:
        create_folder(maps, "--maps")
        check_writable(maps / "maps.check")


def _map_saver(scorer, pairs: Pairs, folder: Path | None):
    """saver(scored) -> an on_maps callback that saves each scored pair's maps as ``<stem>.npz`` in
    ``folder`` (None without a folder)."""
    if folder is None:
        return lambda scored: None
    check_outputs(None, folder)
    stems = dict(zip(((p.dist, p.ref) for p in pairs), map_file_stems([p.name for p in pairs])))

    def saver(scored: Pairs):
        def save(indices, maps):
            for i, pair_maps in zip(indices, maps):
                pair_maps.save(folder / f"{stems[(scored[i].dist, scored[i].ref)]}.npz")
        return save
    return saver


def barrier() -> None:
    """Wait for every process of the torchrun job (only under one: torch is loaded then)."""
    import torch.distributed as tdist

    tdist.barrier()

