"""Scoring any image pairs with a trained AHIQ: ``ahiq.Scorer`` and ``python -m ahiq score``."""
from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as tdist

from ahiq.data import CropPlan, DatasetError, Pair, Pairs, Part, check_images
from ahiq.data.images import IMAGE_EXTENSIONS
from ahiq.files import release_and_remove, take_lock
from ahiq.messages import create_folder
from ahiq.nn.backbones import Pretrained
from ahiq.nn.downloads import sha256_of
from ahiq.nn.model import AHIQ
from ahiq.runtime.device import Runtime, select_device
from ahiq.runtime.distributed import Job
from ahiq.runtime.signals import StopSignals, Stopped
from ahiq.scoring.inference import maps_of, predict, reference_shares
from ahiq.scoring.journal import (Journal, check_settings, check_writable, count_rows, csv_row, finish, journal_paths,
                                  read_journals, record_settings)
from ahiq.scoring.maps import QualityMaps, check_maps, map_file_stems, write_panels

PathLike = str | os.PathLike


def pair_files(dist: PathLike, ref: PathLike) -> Pairs:
    """Two files; two folders whose images are paired by file name (letter case ignored); or a folder of
    distorted images and the one reference file they are all versions of."""
    dist, ref = Path(dist), Path(ref)
    for path in (dist, ref):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    if dist.is_file() and ref.is_file():
        return Pairs([Pair(str(ref.resolve()), str(dist.resolve()), float("nan"), dist.name)])

    def images(folder: Path) -> dict[str, Path]:
        return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}

    if dist.is_dir() and ref.is_file():
        found = images(dist)
        if not found:
            raise DatasetError(f"no images in {dist}")
        return Pairs([Pair(str(ref.resolve()), str(p.resolve()), float("nan"), p.name) for p in found.values()])
    if not (dist.is_dir() and ref.is_dir()):
        raise DatasetError(f"give two files, two folders, or a folder of distorted images and their one reference "
                           f"file; got the file {dist} and the folder {ref}")
    dists, refs = images(dist), images(ref)
    unpaired = sorted(set(dists) ^ set(refs))
    if unpaired:
        where = [f"{n} (only in {dist if n in dists else ref})" for n in unpaired]
        raise DatasetError(f"{len(unpaired)} images have no partner of the same name: {', '.join(where[:5])}"
                           + (" ..." if len(where) > 5 else ""))
    if not dists:
        raise DatasetError(f"no images in {dist}")
    return Pairs([Pair(str(refs[n].resolve()), str(dists[n].resolve()), float("nan"), dists[n].name) for n in dists])


def pairs_from_csv(path: PathLike) -> Pairs:
    """A CSV with ``dist`` and ``ref`` columns (paths relative to the CSV's folder or absolute)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"dist", "ref"} <= set(rows[0]):
        raise DatasetError(f"{path} needs a header with 'dist' and 'ref' columns")
    pairs, missing = [], []
    for number, row in enumerate(rows, start=2):
        dist, ref = (Path(row[k]) if Path(row[k]).is_absolute() else path.parent / row[k] for k in ("dist", "ref"))
        missing += [f"{path}:{number}: {p}" for p in (dist, ref) if not p.is_file()]
        pairs.append(Pair(str(ref.resolve()), str(dist.resolve()), float("nan"), row["dist"]))
    if missing:
        raise DatasetError(f"{len(missing)} listed images not found: {'; '.join(missing[:5])}")
    return Pairs(pairs)


class Scorer:
    """A trained AHIQ (one checkpoint or an ensemble; a released model's name such as ``pipal``, the default,
    or a file) that scores image pairs of any size at least the crop, averaging a crop ensemble (default: the
    official 20 random crops, seeded by the reference image's name).

        scorer = Scorer()                                 # the released NTIRE 2022 model
        scorer = Scorer("checkpoints/my_run/best.pth")
        scorer.score("dist.png", "ref.png")               # one float, higher is better
        scorer.score_pairs(pair_files("dist/", "ref/"))   # numpy array
    """

    def __init__(self, checkpoint: PathLike | Sequence[PathLike] = "pipal", patch_size: int = 8,
                 vit_pretrained: Pretrained = True, cnn_pretrained: Pretrained = True, crops: str = "random",
                 num_crops: int = 20, seed: int = 0, device: str | torch.device = "auto", batch_size: int = 1,
                 runtime: Runtime = Runtime(), allow_random_backbones: bool = False, weights: PathLike | None = None):
        paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
        self.device = device if isinstance(device, torch.device) else select_device(device, "device")
        self.runtime = runtime
        self.models = [runtime.prepare(AHIQ.from_pretrained(p, patch_size=patch_size, vit_pretrained=vit_pretrained,
                                                            cnn_pretrained=cnn_pretrained, weights=weights,
                                                            allow_random_backbones=allow_random_backbones),
                                       self.device).eval() for p in paths]
        self.plan = CropPlan(self.models[0].config["img_size"], crops, num_crops, seed)
        self.batch_size = batch_size

    def score_pairs(self, pairs: Pairs, progress: bool = False, on_reference=None, on_maps=None) -> np.ndarray:
        """Scores of ``pairs`` in their order; ``on_reference(indices, scores)`` as each reference is done;
        ``on_maps`` as evaluation.predict's."""
        check_images(pairs, self.plan.size, whole=self.plan.mode == "whole")  # every pair before the first score
        return predict(self.models, Part(pairs, None), self.plan, self.batch_size, 0, self.device, progress=progress,
                       runtime=self.runtime, on_reference=on_reference, on_maps=on_maps)

    def settings(self) -> dict:
        """What decides the scores, for resuming a journaled run only with the same: each checkpoint file's
        SHA-256, the backbone weights, the crops, the precision on this device."""
        return {"checkpoints": [f"{m.source.name} sha256 {sha256_of(m.source)}" for m in self.models],
                "backbones": sorted({str(m.backbone_sources) for m in self.models}),
                "crops": [self.plan.size, self.plan.mode, self.plan.count if self.plan.mode == "random" else None,
                          self.plan.seed if self.plan.mode == "random" else None],
                "precision": "bf16" if self.runtime.bf16(self.device) else "fp32"}

    def score(self, dist: PathLike, ref: PathLike) -> float:
        return float(self.score_pairs(pair_files(dist, ref))[0])

    def maps(self, dist: PathLike, ref: PathLike) -> QualityMaps:
        """Two files' score with the maps it is pooled from (ahiq.scoring.maps): per crop on the ViT grid, and at
        image resolution. One model (not an ensemble); the same forward pass as the score."""
        check_maps(self.models)
        pairs = pair_files(dist, ref)
        check_images(pairs, self.plan.size, whole=self.plan.mode == "whole")
        return maps_of(self.models[0], pairs, [0], self.plan, self.device, self.runtime)[0]


def score_to_file(scorer: Scorer, pairs: Pairs, out: Path | None, job: Job = Job(), resume: bool = False,
                  progress: bool = False, maps: Path | None = None, heading: str | None = None) -> None:
    """Score ``pairs`` into the CSV ``out`` (dist,ref,score in the pairs' order), or print ``name,score``
    lines as references finish when ``out`` is None.

    Nothing is held only in memory: each process journals every reference it finishes (ahiq.scoring.journal), so a
    job killed at pair 90,000 keeps them and ``resume`` scores only the rest. Under torchrun the processes
    share the pairs by reference and rank 0 writes ``out`` from all journals. SIGTERM or SIGINT stops at
    the next reference with everything scored kept (Stopped). ``maps``: a folder that gets each pair's
    quality maps (``<name>.npz``, saved as the pair is scored) and, at the end, its panel (``<name>.png``).
    ``heading``: printed (rank 0, standard error) once everything is checked, as scoring begins."""
    if maps is not None:  # before anything is scored
        check_maps(scorer.models)
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


def _score_to_journals(scorer: Scorer, pairs: Pairs, out: Path, job: Job, resume: bool, progress: bool,
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
        tdist.barrier()  # every process has read the journals before any process appends to them
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
            tdist.barrier()  # every process's journal is complete
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


def _map_saver(scorer: Scorer, pairs: Pairs, folder: Path | None):
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
