"""Crop-ensemble prediction, which computes each reference crop's features once for all its distorted
images, and ``run_test`` (test.py): metrics and reports for a labelled set, an NTIRE 2022 submission for
an unlabelled one."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import EvalPairs, Part, check_images, load_parts
from .data.parts import subset
from .distributed import Dist, destroy, gather_object, init_distributed
from .maps import ONE_MODEL, pair_maps, write_panels
from .metrics import evaluate, logistic4, summary_line
from .head import weighted_mean
from .model import AHIQ, ReferenceFeatures
from .runtime import Runtime
from .signals import batches, ignore_in_workers
from .zoo import is_zoo_name


@torch.no_grad()
def predict(models: Sequence[AHIQ], part: Part, crop_size: int, crops: str, num_crops: int = 20, seed: int = 0,
            batch_size: int = 2, num_workers: int = 0, device: torch.device = torch.device("cpu"),
            progress: bool | str = False, runtime: Runtime = Runtime(),
            on_reference: Callable[[list[int], np.ndarray], None] | None = None,
            on_maps: Callable[[list[int], np.ndarray, np.ndarray], None] | None = None) -> np.ndarray:
    """Per-pair scores: the mean over the evaluation crops and over the models (an ensemble), in the order
    of ``part.pairs``; no pair is dropped. Images must have been checked (check_images) by the caller.

    Pairs are taken grouped by reference. All distorted images of a reference are cut at the same windows,
    so the reference crops' features (offsets, reduced head features) are computed once per reference and
    reused; the distorted images of one reference are scored ``batch_size`` at a time (a batch never mixes
    references, so a pair's score does not depend on the other references scored), at most
    ``runtime.crop_chunk`` crops per forward pass. ``on_reference(indices, scores)`` is called as each
    reference's pairs are done; ``on_maps(indices, scores, maps)`` with each batch's crop maps [2 (score,
    weight), P, K, h, w] from the same forward pass (one model only); ``progress``: a progress bar (a string: its label).
    """
    if on_maps is not None and len(models) > 1:
        raise ValueError(ONE_MODEL)
    groups = reference_groups(part.pairs)
    plan = [group[a:a + batch_size] for group in groups for a in range(0, len(group), batch_size)]
    ends_reference = [a + batch_size >= len(group) for group in groups for a in range(0, len(group), batch_size)]
    dataset = EvalPairs(part.pairs, crop_size, crops, num_crops, seed, check=False,
                        reference_for={group[0] for group in groups})
    # Batches of ragged items: the reference crops come with the first pair of each reference only.
    loader = DataLoader(dataset, batch_sampler=plan, num_workers=num_workers, collate_fn=_collate_eval,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_in_workers)
    for m in models:
        m.eval()
    out = np.empty(len(part.pairs))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(part.pairs), desc=progress if isinstance(progress, str) else "predict", unit="pair",
                   dynamic_ncols=True, disable=None)
    chunk = runtime.crop_chunk
    cached, done = [], []  # the current reference's features, and its pairs scored so far
    with batches(loader) as loaded:  # workers shut down at the end, also by an exception
        for (dist, refs_crops, index), last in zip(loaded, ends_reference):
            k = dist.shape[1]
            indices = index.tolist()
            try:
                with runtime.autocast(device):
                    if refs_crops[0].numel():  # the first batch of a reference: its features, once
                        ref_crops = runtime.inputs(refs_crops[0], device)
                        cached = [_in_chunks(runtime.entry(m, "reference_features"), ref_crops, chunk)
                                  for m in models]
                    maps = [] if on_maps is not None else None
                    scores = torch.stack([_score_group(m, dist, feats, chunk, runtime, device, maps)
                                          for m, feats in zip(models, cached)]).mean(0)
            except torch.OutOfMemoryError as exc:
                raise MemoryError(f"out of memory on {device} scoring {len(indices)} pairs x {k} crops, "
                                  f"{min(chunk, len(indices) * k)} crops per forward pass: lower "
                                  f"runtime.crop_chunk (now {chunk}), or the pairs per batch (test.batch_size; "
                                  f"train.batch_size during validation; now {batch_size})") from exc
            out[indices] = scores.double().cpu().numpy()
            if on_maps is not None:
                on_maps(indices, out[indices], maps[0])
            done += indices
            if bar is not None:
                bar.update(len(indices))
            if last:
                if on_reference is not None:
                    on_reference(done, out[done])
                done = []
    if bar is not None:
        bar.close()
    return out


def reference_groups(pairs: Sequence) -> list[list[int]]:
    """Indices of ``pairs`` grouped by reference image, references in sorted order, pairs in their order."""
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.ref, []).append(i)
    return [groups[ref] for ref in sorted(groups)]


def _in_chunks(reference_features, crops: torch.Tensor, chunk: int) -> ReferenceFeatures:
    parts = [reference_features(crops[a:a + chunk]) for a in range(0, crops.shape[0], chunk)]
    return parts[0] if len(parts) == 1 else ReferenceFeatures(*(torch.cat(t) for t in zip(*parts)))


def _score_group(model: AHIQ, dist: torch.Tensor, ref: ReferenceFeatures, chunk: int, runtime: Runtime,
                 device: torch.device, maps: list | None = None) -> torch.Tensor:
    """Mean score over the crops of each pair in ``dist`` [P, K, 3, S, S] (one reference), at most ``chunk``
    crops per forward pass: whole pairs together when their crops fit, else windows of one pair's crops.
    ``maps``: a list that receives the crops' score and weight maps [P, K, h, w] (the same forward pass)."""
    p, k = dist.shape[:2]
    forward = runtime.entry(model, "maps_with_reference")
    total = torch.zeros(p, device=device)
    kept = None
    for a in range(0, k, chunk):
        window = min(chunk, k - a)
        feats = ReferenceFeatures(ref.offset[a:a + window], ref.reduced[a:a + window])
        per_pass = max(1, chunk // window)
        for s in range(0, p, per_pass):
            crops = runtime.inputs(dist[s:s + per_pass, a:a + window].flatten(0, 1), device)
            score_map, weight_map = forward(crops, feats)
            total[s:s + per_pass] += weighted_mean(score_map, weight_map).float().view(-1, window).sum(1)
            if maps is not None:
                if kept is None:
                    kept = torch.empty(2, p, k, *score_map.shape[-2:])
                kept[:, s:s + per_pass, a:a + window] = torch.stack((score_map, weight_map)).float().view(
                    2, -1, window, *score_map.shape[-2:]).cpu()
    if maps is not None:
        maps.append(kept.numpy())
    return total / k


def _collate_eval(items):
    """EvalPairs items -> (distorted crops [B, K, 3, S, S], list of reference crops or empty tensors, indices)."""
    return (torch.stack([item[0] for item in items]), [item[1] for item in items],
            torch.tensor([item[3] for item in items]))


def reference_shares(pairs: Sequence, world: int) -> list[list[int]]:
    """The pair indices of each of ``world`` processes: whole references (each reference's features are
    computed by one process only), balanced by pair count (largest reference first to the least loaded
    process; the same on every process)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    for group in sorted(reference_groups(pairs), key=len, reverse=True):
        min(shares, key=len).extend(group)
    return [sorted(share) for share in shares]


def predict_shared(models: Sequence[AHIQ], part: Part, dist: Dist, **kwargs) -> np.ndarray:
    """predict() with whole references shared out over the processes and the scores gathered on every
    process. With a progress bar, each process shows its own share."""
    if dist.world == 1:
        return predict(models, part, **kwargs)
    if kwargs.get("progress"):
        kwargs["progress"] = f"predict (process {dist.rank} of {dist.world}: its share)"
    mine = reference_shares(part.pairs, dist.world)[dist.rank]
    scores = predict(models, subset(part.pairs, None, mine), **kwargs) if mine else np.empty(0)
    out = np.empty(len(part.pairs))
    for indices, values in gather_object((mine, scores), dist):
        out[indices] = values
    return out


# ---- test.py -----------------------------------------------------------------------------------------------

def checkpoint_paths(opt: dict, experiment_dir: Path) -> list[Path | str]:
    """The files ``test.checkpoint`` names: best, latest, a path, a released model's name (ahiq.zoo), or a
    list of them (an ensemble)."""
    given = opt["test"]["checkpoint"]
    paths = []
    for item in given if isinstance(given, list) else [given]:
        if is_zoo_name(item):
            paths.append(item)  # fetched when loaded
            continue
        path = experiment_dir / f"{item}.pth" if item in ("best", "latest") else Path(item)
        if not path.exists():  # a file, or a weights folder holding a released model
            raise FileNotFoundError(f"test.checkpoint: {path} does not exist (train first, or set "
                                    f"test.checkpoint=<path> or a list of paths for an ensemble)")
        paths.append(path)
    return paths


def run_default_test(opt: dict, checkpoints_root: str | Path = "checkpoints") -> dict:
    """A bare ``python test.py``: the experiment's best checkpoint when there is one, else the released
    ``pipal`` model; the first line says which."""
    best = Path(checkpoints_root) / opt["name"] / "best.pth"
    if opt["test"]["checkpoint"] == "best" and not best.is_file():
        opt["test"]["checkpoint"] = "pipal"
        print(f"testing the released model 'pipal' (no {best} yet: train with python train.py --opt ... first "
              f"to test your own)", flush=True)
    else:
        print(f"testing {best if opt['test']['checkpoint'] == 'best' else opt['test']['checkpoint']}", flush=True)
    return run_test(opt, checkpoints_root)


def run_test(opt: dict, checkpoints_root: str | Path = "checkpoints") -> dict:
    """Score the test part with one checkpoint or an ensemble of them. Labelled: predictions, metrics.json,
    a scatter plot and one summary line. Unlabelled: an NTIRE 2022 submission. Under torchrun the pairs
    are shared out by reference, and rank 0 writes."""
    dist, device = init_distributed(opt["train"]["device"])
    try:
        return _run_test(opt, Path(checkpoints_root) / opt["name"], dist, device)
    finally:
        destroy(dist)


def _run_test(opt: dict, experiment_dir: Path, dist: Dist, device: torch.device) -> dict:
    from .report import scatter_plot, write_metrics, write_predictions
    from .submission import write_ntire_submission

    test_opt = opt["test"]
    paths = checkpoint_paths(opt, experiment_dir)
    if test_opt["maps"] and len(paths) > 1:  # before the test, not after it
        raise ValueError(f"test.maps: {ONE_MODEL}")
    part = load_parts(opt["data"], roles=("test",))["test"]
    runtime = Runtime(**opt["runtime"])
    models = [runtime.prepare(AHIQ.from_pretrained(p, allow_random_backbones=test_opt["allow_random_backbones"],
                                                  **opt["model"]), device) for p in paths]
    crop = models[0].config["img_size"]
    check_images(part.pairs, crop, whole=test_opt["crops"] == "whole")  # before the first pair is scored
    out_dir = Path(test_opt["output"]) if test_opt["output"] else experiment_dir / "test"
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pred = predict_shared(models, part, dist, crop_size=crop, crops=test_opt["crops"], num_crops=test_opt["num_crops"],
                          seed=test_opt["seed"], batch_size=test_opt["batch_size"],
                          num_workers=opt["data"]["num_workers"], device=device, progress=dist.main, runtime=runtime)
    seconds_per_image = (time.time() - start) / len(pred) * dist.world  # each process's time per image
    names = [p.name for p in part.pairs]
    if part.targets is None:
        sub = test_opt["submission"]
        seconds = sub["runtime"] if sub["runtime"] is not None else seconds_per_image
        gpu = sub["gpu"] if sub["gpu"] is not None else device.type == "cuda"
        zip_path = out_dir / "submission.zip"
        if dist.main:
            zip_path = write_ntire_submission(dict(zip(names, pred.tolist())), out_dir, seconds, gpu,
                                              sub["extra_data"], sub["description"])
            print(f"wrote {zip_path} ({len(names)} images, {seconds_per_image:.3f} s per image)")
        return {"submission": str(zip_path)}
    metrics = evaluate(pred, part.targets)
    if dist.main:
        write_predictions(out_dir / "results.txt", names, pred)
        write_metrics(out_dir / "metrics.json", metrics, checkpoints=[str(p) for p in paths],
                      dataset=part.pairs.dataset, crops=test_opt["crops"], num_crops=test_opt["num_crops"])
        scatter_plot(out_dir / "scatter.png", pred, part.targets, metrics.get("logistic"),
                     f"{opt['name']} on {part.pairs.dataset}: SROCC {metrics['srocc']:.4f} PLCC {metrics['plcc']:.4f}")
        print(summary_line(metrics))
        if test_opt["maps"]:
            _extreme_maps(out_dir / "maps", models, part, pred, metrics.get("logistic"), test_opt, crop, device,
                          runtime)
    return metrics


def maps_of(model: AHIQ, pairs, indices: Sequence[int], crop: int, crops: str, num_crops: int, seed: int,
            device: torch.device, runtime: Runtime = Runtime()) -> list:
    """The QualityMaps of ``pairs[indices]`` (ahiq.maps): those pairs scored with their maps."""
    found = {}

    def keep(batch, scores, maps):
        for i, score, crop_maps in zip(batch, scores, maps.swapaxes(0, 1)):
            found[i] = pair_maps(pairs[indices[i]], float(score), crop_maps, crop, crops, num_crops, seed)

    predict([model], subset(pairs, None, list(indices)), crop, crops, num_crops, seed, 1, 0, device, runtime=runtime,
            on_maps=keep)
    return [found[i] for i in range(len(indices))]


def _extreme_maps(folder: Path, models: Sequence[AHIQ], part: Part, pred: np.ndarray, logistic, test_opt: dict,
                  crop: int, device: torch.device, runtime: Runtime) -> None:
    """test.maps=N: the quality maps of the N pairs predicted worst (largest error after the logistic fit)
    and the N best, as panels and arrays in ``folder``: those 2N pairs scored again (deterministic crops, so
    the same scores) with their maps, instead of keeping every pair's maps through the whole test."""
    fitted = logistic4(pred, *logistic) if logistic is not None else pred
    order = np.argsort(np.abs(fitted - part.targets), kind="stable")
    n = min(test_opt["maps"], len(order) // 2)
    chosen = {f"worst_{rank + 1}": i for rank, i in enumerate(order[::-1][:n])}
    chosen.update({f"best_{rank + 1}": i for rank, i in enumerate(order[:n])})
    stems = [f"{label}_{Path(part.pairs[i].name).stem}" for label, i in chosen.items()]
    folder.mkdir(parents=True, exist_ok=True)
    found = maps_of(models[0], part.pairs, list(chosen.values()), crop, test_opt["crops"], test_opt["num_crops"],
                    test_opt["seed"], device, runtime)
    for stem, maps in zip(stems, found):
        maps.save(folder / f"{stem}.npz")
    write_panels(folder, [part.pairs[i] for i in chosen.values()], stems)
    print(f"wrote the quality maps of the {n} worst and {n} best predicted pairs to {folder}")
