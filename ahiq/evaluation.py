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

from .data import CropPlan, EvalPairs, Part, check_images, load_parts
from .data.parts import subset
from .distributed import Job, destroy, gather_object, init_distributed
from .maps import ONE_MODEL, QualityMaps, write_panels
from .correlations import evaluate, logistic4, summary_line
from .model import AHIQ
from .runtime import Runtime
from .scoring import out_of_memory_advice, score_group
from .signals import batches, ignore_in_workers
from .zoo import is_zoo_name


@torch.no_grad()
def predict(models: Sequence[AHIQ], part: Part, plan: CropPlan, batch_size: int = 2, num_workers: int = 0,
            device: torch.device = torch.device("cpu"), progress: bool | str = False, runtime: Runtime = Runtime(),
            on_reference: Callable[[list[int], np.ndarray], None] | None = None,
            on_maps: Callable[[list[int], list[QualityMaps]], None] | None = None) -> np.ndarray:
    """Per-pair scores of image files: ahiq.scoring.score_group on the decoded images, in the order of
    ``part.pairs``; no pair is dropped. Images must have been checked (check_images) by the caller.

    The files are decoded in a DataLoader and taken grouped by reference: the reference's crop features are
    computed once and passed on to the next batches of its distorted images, which are scored ``batch_size``
    at a time (a batch never mixes references, so a pair's score does not depend on the other references
    scored). ``on_reference(indices, scores)`` is called as each reference's pairs are done; ``on_maps(indices,
    maps)`` with each batch's QualityMaps (one model only); ``progress``: a progress bar (a string: its
    label)."""
    if on_maps is not None and len(models) > 1:
        raise ValueError(ONE_MODEL)
    groups = reference_groups(part.pairs)
    batched = [group[a:a + batch_size] for group in groups for a in range(0, len(group), batch_size)]
    ends_reference = [a + batch_size >= len(group) for group in groups for a in range(0, len(group), batch_size)]
    dataset = EvalPairs(part.pairs, plan, check=False, reference_for={group[0] for group in groups})
    # Batches of ragged items: the reference image comes with the first pair of each reference only.
    loader = DataLoader(dataset, batch_sampler=batched, num_workers=num_workers, collate_fn=lambda items: items,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_in_workers)
    for m in models:
        m.eval()
    chunk = runtime.crops_per_pass(models[0], device)
    out = np.empty(len(part.pairs))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(part.pairs), desc=progress if isinstance(progress, str) else "predict", unit="pair",
                   dynamic_ncols=True, disable=None)
    features, done = None, []  # the current reference's features, and its pairs scored so far
    with batches(loader) as loaded:  # workers shut down at the end, also by an exception
        for items, last in zip(loaded, ends_reference):
            indices = [item[3] for item in items]
            ref = items[0][1] if items[0][1].numel() else None
            if ref is not None:
                features = None  # a new reference
            with out_of_memory_advice(device, len(items), len(plan.windows(*items[0][0].shape[-2:])), chunk,
                                      "test.batch_size; train.batch_size during validation; --batch-size"):
                scored = score_group(models, plan, ref, [item[0] for item in items],
                                     Path(part.pairs[indices[0]].ref).name, runtime, device, chunk,
                                     maps=on_maps is not None, features=features)
            features = scored.features
            out[indices] = scored.scores.double().cpu().numpy()
            if on_maps is not None:
                on_maps(indices, scored.maps)
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


def reference_shares(pairs: Sequence, world: int) -> list[list[int]]:
    """The pair indices of each of ``world`` processes: whole references (each reference's features are
    computed by one process only), balanced by pair count (largest reference first to the least loaded
    process; the same on every process)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    for group in sorted(reference_groups(pairs), key=len, reverse=True):
        min(shares, key=len).extend(group)
    return [sorted(share) for share in shares]


def predict_shared(models: Sequence[AHIQ], part: Part, job: Job, **kwargs) -> np.ndarray:
    """predict() with whole references shared out over the processes and the scores gathered on every
    process. With a progress bar, each process shows its own share."""
    if job.world == 1:
        return predict(models, part, **kwargs)
    if kwargs.get("progress"):
        kwargs["progress"] = f"predict (process {job.rank} of {job.world}: its share)"
    mine = reference_shares(part.pairs, job.world)[job.rank]
    scores = predict(models, subset(part.pairs, None, mine), **kwargs) if mine else np.empty(0)
    out = np.empty(len(part.pairs))
    for indices, values in gather_object((mine, scores), job):
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
                                    f"test.checkpoint=<path>, a list of paths for an ensemble, or pipal for the "
                                    f"released model)")
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
    job, device = init_distributed(opt["train"]["device"])
    try:
        return _run_test(opt, Path(checkpoints_root) / opt["name"], job, device)
    finally:
        destroy(job)


def _run_test(opt: dict, experiment_dir: Path, job: Job, device: torch.device) -> dict:
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
    if job.main:
        print(f"{opt['name']}: {len(part.pairs)} test pairs ({part.pairs.dataset}); {runtime.describe(device)}; "
              f"{job.world} process(es)", flush=True)
    out_dir = Path(test_opt["output"]) if test_opt["output"] else experiment_dir / "test"
    if job.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    plan = CropPlan(crop, test_opt["crops"], test_opt["num_crops"], test_opt["seed"])
    pred = predict_shared(models, part, job, plan=plan, batch_size=test_opt["batch_size"],
                          num_workers=opt["data"]["num_workers"], device=device, progress=job.main, runtime=runtime)
    seconds_per_image = (time.time() - start) / len(pred) * job.world  # each process's time per image
    names = [p.name for p in part.pairs]
    if part.targets is None:
        sub = test_opt["submission"]
        seconds = sub["runtime"] if sub["runtime"] is not None else seconds_per_image
        gpu = sub["gpu"] if sub["gpu"] is not None else device.type == "cuda"
        zip_path = out_dir / "submission.zip"
        if job.main:
            zip_path = write_ntire_submission(dict(zip(names, pred.tolist())), out_dir, seconds, gpu,
                                              sub["extra_data"], sub["description"])
            print(f"wrote {zip_path} ({len(names)} images, {seconds_per_image:.3f} s per image)")
        return {"submission": str(zip_path)}
    metrics = evaluate(pred, part.targets)
    if job.main:
        write_predictions(out_dir / "results.txt", names, pred)
        random = {"num_crops": test_opt["num_crops"], "seed": test_opt["seed"]} if test_opt["crops"] == "random" else {}
        write_metrics(out_dir / "metrics.json", metrics, checkpoints=[str(p) for p in paths],
                      dataset=part.pairs.dataset, crops=test_opt["crops"], **random)
        scatter_plot(out_dir / "scatter.png", pred, part.targets, metrics.get("logistic"),
                     f"{opt['name']} on {part.pairs.dataset}: SROCC {metrics['srocc']:.4f} PLCC {metrics['plcc']:.4f}")
        print(summary_line(metrics))
        print(f"wrote results.txt (each pair's score), metrics.json and scatter.png to {out_dir}")
        if test_opt["maps"]:
            _extreme_maps(out_dir / "maps", models[0], part, pred, metrics.get("logistic"), test_opt["maps"], plan,
                          device, runtime)
    return metrics


def maps_of(model: AHIQ, pairs, indices: Sequence[int], plan: CropPlan, device: torch.device,
            runtime: Runtime = Runtime()) -> list[QualityMaps]:
    """The QualityMaps of ``pairs[indices]`` (ahiq.maps): those pairs scored with their maps."""
    found: dict[int, QualityMaps] = {}
    predict([model], subset(pairs, None, list(indices)), plan, 1, device=device, runtime=runtime,
            on_maps=lambda batch, maps: found.update(zip(batch, maps)))
    return [found[i] for i in range(len(indices))]


def _extreme_maps(folder: Path, model: AHIQ, part: Part, pred: np.ndarray, logistic, n: int, plan: CropPlan,
                  device: torch.device, runtime: Runtime) -> None:
    """test.maps=N: the quality maps of the N pairs predicted worst (largest error after the logistic fit)
    and the N best, as panels and arrays in ``folder``: those 2N pairs scored again (deterministic crops, so
    the same scores) with their maps, instead of keeping every pair's maps through the whole test."""
    fitted = logistic4(pred, *logistic) if logistic is not None else pred
    order = np.argsort(np.abs(fitted - part.targets), kind="stable")
    n = min(n, len(order) // 2)
    chosen = {f"worst_{rank + 1}": i for rank, i in enumerate(order[::-1][:n])}
    chosen.update({f"best_{rank + 1}": i for rank, i in enumerate(order[:n])})
    stems = [f"{label}_{Path(part.pairs[i].name).stem}" for label, i in chosen.items()]
    fit = " after the logistic fit" if logistic is not None else ""
    titles = [f"{stem}\npredicted {pred[i]:.4f}, MOS {part.pairs[i].mos:g} (target {part.targets[i]:.4f}), "
              f"error {fitted[i] - part.targets[i]:+.4f}{fit}" for stem, i in zip(stems, chosen.values())]
    folder.mkdir(parents=True, exist_ok=True)
    for stem, maps in zip(stems, maps_of(model, part.pairs, list(chosen.values()), plan, device, runtime)):
        maps.save(folder / f"{stem}.npz")
    write_panels(folder, [part.pairs[i] for i in chosen.values()], stems, titles)
    print(f"wrote the quality maps of the {n} worst and {n} best predicted pairs to {folder}")
