"""test.py's driver: metrics and reports for a labelled set, an NTIRE 2022 submission for an unlabelled one,
with one checkpoint or an ensemble, under torchrun too."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ahiq.data import Part, load_parts
from ahiq.engine.correlations import correlate, logistic4
from ahiq.engine.results import Results, analyse, write_ntire_submission, write_report
from ahiq.messages import check_folder, create_folder
from ahiq.nn.zoo import released
from ahiq.registry.baselines import BASELINES
from ahiq.registry.released import RELEASED
from ahiq.runtime.device import Runtime
from ahiq.runtime.distributed import Job, destroy, init_distributed
from ahiq.runtime.signals import StopSignals, Stopped
from ahiq.scoring.baselines import BaselineScorer
from ahiq.scoring.ensemble import Ensemble, load_ensemble
from ahiq.scoring.inference import maps_of, score_shared
from ahiq.scoring.journal import read_scores
from ahiq.scoring.maps import write_panels
from ahiq.scoring.output import barrier, score_to_file
from ahiq.scoring.scorer import EnsembleScorer


def checkpoint_paths(opt: dict, experiment_dir: Path) -> list[Path | str]:
    """The files ``test.checkpoint`` names: best, latest, a path, a released model's name (ahiq.nn.zoo), or a
    list of them (an ensemble)."""
    given = opt["test"]["checkpoint"]
    paths = []
    for item in given if isinstance(given, list) else [given]:
        if released(item) is not None:
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
    model (else, with ``test.baselines``, the baselines alone); the first line says which."""
    best = Path(checkpoints_root) / opt["name"] / "best.pth"
    if opt["test"]["checkpoint"] == "best" and not best.is_file() and not opt["test"]["baselines"]:
        opt["test"]["checkpoint"] = RELEASED.default.name
        print(f"testing the released model '{RELEASED.default.name}' (no {best} yet: train with python train.py "
              f"--opt ... first to test your own)", flush=True)
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


def _trained_model_absent(opt: dict, experiment_dir: Path) -> bool:
    """test.checkpoint is the experiment's best or latest, and the experiment has none yet."""
    given = opt["test"]["checkpoint"]
    return given in ("best", "latest") and not (experiment_dir / f"{given}.pth").is_file()


def _run_test(opt: dict, experiment_dir: Path, job: Job, device: torch.device) -> dict:
    test_opt = opt["test"]
    baselines_alone = bool(test_opt["baselines"]) and _trained_model_absent(opt, experiment_dir)
    paths = [] if baselines_alone else checkpoint_paths(opt, experiment_dir)
    part = load_parts(opt["data"], roles=("test",))["test"]
    out_dir = Path(test_opt["output"]) if test_opt["output"] else experiment_dir / "test"
    if test_opt["maps"] and (baselines_alone or part.targets is None):
        why = (f"no AHIQ model is tested (no {test_opt['checkpoint']}.pth in {experiment_dir}: the baselines alone)"
               if baselines_alone else f"the test part ({part.pairs.dataset}) is unlabelled (an NTIRE submission)")
        raise ValueError(f"test.maps {test_opt['maps']}: the maps of the pairs predicted worst and best need AHIQ's "
                         f"predictions and the labels, and {why}; leave test.maps out")
    if job.main:  # every folder written to proven writable before anything is loaded or scored (none made yet)
        for folder in [out_dir, *(out_dir / "baselines" / name for name in test_opt["baselines"]),
                       *([out_dir / "maps"] if test_opt["maps"] else [])]:
            check_folder(folder, "test.output")
    baselines = _baseline_scorers(test_opt["baselines"], part, device, opt["model"]["weights"])  # before any scoring
    if baselines_alone:
        if job.main:
            print(f"{opt['name']}: no {test_opt['checkpoint']}.pth in {experiment_dir}: scoring the baselines alone "
                  f"({', '.join(baselines)}) on {len(part.pairs)} test pairs ({part.pairs.dataset})", flush=True)
        return _score_baselines(baselines, part, out_dir, job, opt)
    ensemble = load_ensemble(paths, device, Runtime(**opt["runtime"]), test_opt["crops"], test_opt["num_crops"],
                             test_opt["seed"], test_opt["allow_random_backbones"], **opt["model"])
    if test_opt["maps"]:  # before the test, not after it
        ensemble.check_maps("test.maps")
    scorer = EnsembleScorer(ensemble, test_opt["batch_size"], opt["data"]["num_workers"])
    scorer.check(part.pairs)  # every image before the first pair is scored
    if job.main:
        print(f"{opt['name']}: {len(part.pairs)} test pairs ({part.pairs.dataset}); {scorer.describe()}; "
              f"{job.world} process(es)", flush=True)
        create_folder(out_dir, "test.output")
    start = time.time()
    with StopSignals() as signals:
        def stop_if_asked(indices, scores):  # after each reference: a stop ends the run in one line
            if signals.requested:
                raise Stopped(f"stopped by {signals.name} while scoring the test part: none of AHIQ's scores were "
                              f"written (the baselines' are kept as they are scored); run the same command again",
                              signals.requested)

        pred = score_shared(lambda pairs, progress: scorer.score_pairs(pairs, progress, stop_if_asked), part.pairs,
                            job, progress=job.main)
    broken = [p.name for p, value in zip(part.pairs, pred) if not np.isfinite(value)]
    if broken:
        raise FloatingPointError(f"the model scored {len(broken)} pairs {pred[~np.isfinite(pred)][0]} (e.g. "
                                 f"{broken[0]}): its weights give no number there; check the checkpoint")
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
    if not job.main:
        metrics = correlate(pred, part.targets)
    else:
        random = {"num_crops": test_opt["num_crops"], "seed": test_opt["seed"]} if test_opt["crops"] == "random" else {}
        metrics = _report(out_dir, Results.of(part, pred, opt["name"]), opt, checkpoints=[str(p) for p in paths],
                          crops=test_opt["crops"], **random)
        if test_opt["maps"]:
            _extreme_maps(out_dir / "maps", ensemble, part, pred, metrics.get("logistic"), test_opt["maps"])
    if baselines:
        _score_baselines(baselines, part, out_dir, job, opt)
    return metrics


def _report(folder: Path, results: Results, opt: dict, **info) -> dict:
    """Write a labelled test's results, analysis and figures into ``folder``; its metrics."""
    bootstrap = opt["test"]["bootstrap"]
    analysis = analyse(results, bootstrap["resamples"], bootstrap["by"], bootstrap["seed"])
    results.write(folder)
    write_report(folder, results, analysis, **info)
    return analysis.metrics


def _baseline_scorers(names: list[str], part: Part, device: torch.device, weights) -> dict:
    """A scorer of each baseline metric, its weights found and every test image checked against its size
    needs, before anything is scored."""
    if names and part.targets is None:
        raise ValueError(f"test.baselines: the test part ({part.pairs.dataset}) is unlabelled; baselines are compared "
                         f"on a labelled one (leave test.baselines out for an NTIRE submission)")
    scorers = {name: BaselineScorer(name, device, weights) for name in names}
    for scorer in scorers.values():
        scorer.check(part.pairs)
    return scorers


def _score_baselines(scorers: dict, part: Part, out_dir: Path, job: Job, opt: dict) -> dict:
    """Each baseline scored into ``<out_dir>/baselines/<name>/`` (scores.csv journaled as the scorer's: a rerun
    continues it), then reported as AHIQ is; the metrics of each."""
    out = {}
    for name, scorer in scorers.items():
        folder = out_dir / "baselines" / name
        if job.main:
            create_folder(folder, "test.output")
        if job.world > 1:
            barrier()
        scores_csv = folder / "scores.csv"
        score_to_file(scorer, part.pairs, scores_csv, job, resume=True, progress=job.main,
                      heading=f"{BASELINES[name].label}: {len(part.pairs)} pairs")
        if job.main:
            scores = read_scores(scores_csv, part.pairs)
            out[name] = _report(folder, Results.of(part, scores, BASELINES[name].label), opt, metric=name,
                                settings=scorer.settings())
    return out


def _extreme_maps(folder: Path, ensemble: Ensemble, part: Part, pred: np.ndarray, logistic, n: int) -> None:
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
    create_folder(folder, "test.output")
    for stem, maps in zip(stems, maps_of(ensemble, part.pairs, list(chosen.values()))):
        maps.save(folder / f"{stem}.npz")
    write_panels(folder, [part.pairs[i] for i in chosen.values()], stems, titles)
    print(f"wrote the quality maps of the {n} worst and {n} best predicted pairs to {folder}")
