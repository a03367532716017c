"""Training and evaluation: data sources from the options, the training loop, crop-ensemble prediction,
checkpoints and resume."""
from __future__ import annotations

import logging
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import (DatasetError, EvalPairs, Pairs, TargetScale, TrainPairs, check_images, load_split,
                   read_labels, save_split, split_by_reference)
from .metrics import evaluate, summary_line
from .model import AHIQ, ReferenceFeatures
from .options import save_options
from .runtime import Runtime
from .weights import TEMPORARY_PATTERN, WeightsError, read_weight_file

log = logging.getLogger("ahiq")
MODEL_SIZE_KEYS = ("img_size", "vit_dim", "vit_heads", "cnn_width", "fusion_hidden", "head_dim", "head_hidden")


# ---- data ------------------------------------------------------------------------------------------------

@dataclass
class Part:
    """Pairs of one role (train, val, test) with their training-scale targets (None when unlabelled)."""
    pairs: Pairs
    targets: np.ndarray | None


def _read_source(source: dict) -> Pairs:
    if not source.get("dataset") or not source.get("root"):
        raise DatasetError(f"a data source needs 'dataset' and 'root', got {source}")
    return read_labels(source["dataset"], source["root"], **(source.get("options") or {}))


def _part(pairs: Pairs, scale: TargetScale | None, indices: Sequence[int] | None = None) -> Part:
    if indices is not None:
        pairs = Pairs([pairs[i] for i in indices], pairs.higher_is_better, pairs.dataset)
    targets = scale.to_target([p.mos for p in pairs]) if scale is not None and pairs.labelled else None
    return Part(pairs, targets)


def load_parts(data: dict, experiment_dir: Path | None = None,
               roles: Sequence[str] = ("train", "val", "test")) -> dict[str, Part]:
    """train/val/test parts. Each labelled source is normalised over all of its own pairs (before any split).

    Without ``data.val`` the main source is split by reference (``data.split``; the split is saved in the
    experiment folder, or read from ``data.split.file``); with it, the main source is all training data.
    ``data.test`` (if set) replaces the test part; with ``data.val`` and no ``data.test``, test is val.
    When only the test part is asked for and ``data.test`` is set, the main source is not read at all (an
    NTIRE test set can be scored without the training data).
    """
    if data.get("test") and set(roles) == {"test"}:
        test = _read_source(data["test"])
        return {"test": _part(test, TargetScale.fit(test) if test.labelled else None)}
    main = _read_source(data)
    scale = TargetScale.fit(main)
    parts: dict[str, Part] = {}
    if data.get("val"):
        parts["train"] = _part(main, scale)
        val = _read_source(data["val"])
        parts["val"] = _part(val, TargetScale.fit(val))
        parts["test"] = parts["val"]
    else:
        split = data["split"]
        if split.get("file"):
            indices = load_split(split["file"], main)
        else:
            indices = split_by_reference(main, split["ratios"], split["seed"])
            if experiment_dir is not None:
                save_split(experiment_dir / "split.json", main, indices, dataset=main.dataset, seed=split["seed"],
                           ratios=split["ratios"])
        if len(indices) not in (2, 3):
            raise DatasetError(f"data.split must give 2 parts (train, test) or 3 (train, val, test), got {len(indices)}")
        parts["train"] = _part(main, scale, indices[0])
        parts["val"] = _part(main, scale, indices[1])
        parts["test"] = _part(main, scale, indices[-1])
    if data.get("test"):
        test = _read_source(data["test"])
        parts["test"] = _part(test, TargetScale.fit(test) if test.labelled else None)
    return parts


# ---- model and device ------------------------------------------------------------------------------------

def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is '{name}' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def build_model(model_opt: dict) -> AHIQ:
    return AHIQ(model_opt["patch_size"], model_opt["vit_pretrained"], model_opt["cnn_pretrained"],
                freeze_backbones=model_opt["freeze_backbones"], deform_impl=model_opt["deform_impl"],
                **{k: model_opt[k] for k in MODEL_SIZE_KEYS})


def load_model(path: str | Path, model_opt: dict) -> AHIQ:
    """A model for a checkpoint: this project's (its saved architecture) or an official one (the options')."""
    saved = read_weight_file(path)  # read once: a checkpoint with fine-tuned backbones is large
    if isinstance(saved, dict) and saved.get("format") == "ahiq":
        settings = {k: model_opt[k] for k in ("freeze_backbones", "deform_impl")}  # the rest is in the checkpoint
        return AHIQ.from_saved(saved, Path(path), model_opt["vit_pretrained"], model_opt["cnn_pretrained"], **settings)
    model = build_model(model_opt)
    model.load_saved(saved, Path(path))
    return model


# ---- prediction ------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(models: Sequence[AHIQ], part: Part, crop_size: int, crops: str, num_crops: int = 20, seed: int = 0,
            batch_size: int = 2, num_workers: int = 0, device: torch.device = torch.device("cpu"),
            progress: bool = False, runtime: Runtime = Runtime()) -> np.ndarray:
    """Per-pair scores: the mean over the evaluation crops and over the models (an ensemble), in the order
    of ``part.pairs``; no pair is dropped. Images must have been checked (check_images) by the caller.

    Pairs are taken grouped by reference. All distorted images of a reference are cut at the same windows,
    so the reference crops' features (offsets, reduced head features) are computed once per reference and
    reused; the distorted images of one reference in a batch are scored together, at most
    ``runtime.crop_chunk`` crops per forward pass.
    """
    order = sorted(range(len(part.pairs)), key=lambda i: (part.pairs[i].ref, i))
    first_of_reference = {i for k, i in enumerate(order) if k == 0 or part.pairs[order[k - 1]].ref != part.pairs[i].ref}
    dataset = EvalPairs(part.pairs, crop_size, crops, num_crops, seed, check=False, reference_for=first_of_reference)
    # Batches of ragged items: the reference crops come with the first pair of each reference only.
    loader = DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate_eval, pin_memory=device.type == "cuda")
    for m in models:
        m.eval()
    out = np.empty(len(dataset))
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="predict", unit="batch", dynamic_ncols=True, disable=None)
    chunk = runtime.crop_chunk
    cached_ref, cached = None, []
    for dist, refs_crops, index in loader:
        b, k = dist.shape[:2]
        refs = [part.pairs[i].ref for i in index.tolist()]
        start = 0
        while start < b:
            stop = start + 1
            while stop < b and refs[stop] == refs[start]:
                stop += 1
            try:
                with runtime.autocast(device):
                    if refs[start] != cached_ref:  # sorted by reference: the previous one is finished
                        cached_ref = refs[start]
                        ref_crops = runtime.inputs(refs_crops[start], device)
                        cached = [_in_chunks(m.reference_features, ref_crops, chunk) for m in models]
                    scores = torch.stack([_score_group(m, dist[start:stop], feats, chunk, runtime, device)
                                          for m, feats in zip(models, cached)]).mean(0)
            except torch.OutOfMemoryError as exc:
                raise MemoryError(f"out of memory on {device} scoring {stop - start} pairs x {k} crops, "
                                  f"{min(chunk, (stop - start) * k)} crops per forward pass: lower "
                                  f"runtime.crop_chunk (now {chunk}), or the pairs per batch (test.batch_size; "
                                  f"train.batch_size during validation; now {batch_size})") from exc
            out[index[start:stop].numpy()] = scores.double().cpu().numpy()
            start = stop
    return out


def _in_chunks(reference_features, crops: torch.Tensor, chunk: int) -> ReferenceFeatures:
    parts = [reference_features(crops[a:a + chunk]) for a in range(0, crops.shape[0], chunk)]
    return parts[0] if len(parts) == 1 else ReferenceFeatures(*(torch.cat(t) for t in zip(*parts)))


def _score_group(model: AHIQ, dist: torch.Tensor, ref: ReferenceFeatures, chunk: int, runtime: Runtime,
                 device: torch.device) -> torch.Tensor:
    """Mean score over the crops of each pair in ``dist`` [P, K, 3, S, S] (one reference), at most ``chunk``
    crops per forward pass: whole pairs together when their crops fit, else windows of one pair's crops."""
    p, k = dist.shape[:2]
    total = torch.zeros(p, device=device)
    for a in range(0, k, chunk):
        window = min(chunk, k - a)
        feats = ReferenceFeatures(ref.offset[a:a + window], ref.reduced[a:a + window])
        per_pass = max(1, chunk // window)
        for s in range(0, p, per_pass):
            crops = runtime.inputs(dist[s:s + per_pass, a:a + window].flatten(0, 1), device)
            total[s:s + per_pass] += model.score_with_reference(crops, feats).float().view(-1, window).sum(1)
    return total / k


def _collate_eval(items):
    """EvalPairs items -> (distorted crops [B, K, 3, S, S], list of reference crops or empty tensors, indices)."""
    return (torch.stack([item[0] for item in items]), [item[1] for item in items],
            torch.tensor([item[3] for item in items]))


# ---- training --------------------------------------------------------------------------------------------

def train_step(model, optimizer, scheduler, dist_img, ref_img, target, weight=None, norm: float = 1.0,
               world: int = 1, runtime: Runtime = Runtime()) -> float:
    """One step of the official recipe: MSE on normalised targets, optimiser step, scheduler step (every
    iteration, as the official code does). Returns the loss of the whole global batch. The forward pass
    runs under ``runtime``'s precision (the weights and their gradients stay fp32).

    A non-finite loss leaves the weights and the optimiser state untouched (the scheduler still steps, so
    the schedule stays a function of the iteration); the caller decides whether to stop or go on.
    With several processes, ``weight`` (1 for a sample, 0 for padding) and ``norm`` (global batch size /
    number of processes) make the processes' averaged gradient equal to the MSE gradient of the whole
    global batch, whatever the number of processes; every process sees the same global loss, so all of
    them skip or stop together.
    """
    with runtime.autocast(dist_img.device):
        pred = model(dist_img, ref_img).float()
    if weight is None:
        loss = F.mse_loss(pred, target)
    else:
        loss = (weight * (pred - target) ** 2).sum() / norm
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    total = loss.detach()
    if world > 1:
        import torch.distributed as tdist

        total = total.clone()
        tdist.all_reduce(total)
        total = total / world
    value = total.item()
    if math.isfinite(value):
        optimizer.step()
        scheduler.step()
    else:
        with warnings.catch_warnings():  # a skipped first step is not the misuse this warning is about
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            scheduler.step()
    return value


def make_optimizer(model: AHIQ, train_opt: dict):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=train_opt["lr"], weight_decay=train_opt["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train_opt["t_max"],
                                                           eta_min=train_opt["eta_min"])
    return optimizer, scheduler


def _rng_state() -> dict:
    # numpy's state as a tensor and plain numbers: checkpoints stay loadable with weights_only=True
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU of the machine that saved it: a run resumed on fewer GPUs (trained on four,
        # continued on one) takes the first ones; torch.cuda.set_rng_state_all would fail on the others.
        for index, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun job described by the environment (nccl on CUDA, gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return Dist(tdist.get_rank(), world, local_rank)


def rank_batches(n: int, batch_size: int, dist: Dist, generator: torch.Generator) -> list[list[tuple[int, float]]]:
    """This process's share of every global batch of one epoch, as (index, weight) lists.

    The global order comes from ``generator`` alone; each global batch is cut into equal shares, a short
    share padded with weight-0 copies, so that the training does not depend on the number of processes.
    """
    order = torch.randperm(n, generator=generator).tolist()
    batches = []
    for start in range(0, n, batch_size):
        chunk = order[start:start + batch_size]
        share = -(-len(chunk) // dist.world)
        mine = chunk[dist.rank * share:(dist.rank + 1) * share]
        batches.append([(i, 1.0) for i in mine] + [(chunk[0], 0.0)] * (share - len(mine)))
    return batches


class _Weighted(torch.utils.data.Dataset):
    """Items (index, weight) -> the dataset's sample and the weight."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, weight = item
        return (*self.dataset[index], torch.tensor(weight))


def _gathered_predict(model: AHIQ, part: Part, dist: Dist, **kwargs) -> np.ndarray:
    """predict() with the pairs shared out over the processes and the scores gathered on every process."""
    if dist.world == 1:
        return predict([model], part, **kwargs)
    import torch.distributed as tdist

    mine = list(range(dist.rank, len(part.pairs), dist.world))
    shard = _part(part.pairs, None, mine)
    scores = predict([model], shard, **kwargs) if mine else np.empty(0)
    gathered: list = [None] * dist.world
    tdist.all_gather_object(gathered, (mine, scores))
    out = np.empty(len(part.pairs))
    for indices, values in gathered:
        out[indices] = values
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_logging(experiment_dir: Path) -> None:
    experiment_dir.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(experiment_dir / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)
    log.propagate = False


def _resume_path(opt: dict, experiment_dir: Path) -> Path | None:
    resume = opt["train"]["resume"]
    latest = experiment_dir / "latest.pth"
    if resume is None:
        if latest.exists():
            raise ValueError(f"{experiment_dir} already holds a run (latest.pth): continue it with "
                             f"train.resume=auto, or choose another name=...")
        return None
    if resume == "auto":
        return latest if latest.exists() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"train.resume: checkpoint {resume} does not exist")
    return Path(resume)


def train(opt: dict, checkpoints_root: str | Path = "checkpoints") -> dict:
    """Train with the options ``opt``; returns the best validation metrics. Everything that can be checked
    (options, label files, every image) is checked before the first step. Under torchrun, each process
    trains on its share of every global batch; rank 0 alone writes logs and checkpoints."""
    train_opt, data_opt = opt["train"], opt["data"]
    dist = init_distributed()
    experiment_dir = Path(checkpoints_root) / opt["name"]
    resume_from = _resume_path(opt, experiment_dir)
    if dist.main:
        setup_logging(experiment_dir)
        save_options(opt, experiment_dir / "options.yaml")
        for stale in experiment_dir.glob(TEMPORARY_PATTERN):  # a save that was killed halfway
            log.info(f"removing {stale}, left by an interrupted checkpoint write")
            stale.unlink(missing_ok=True)
    else:
        log.setLevel(logging.WARNING)
    device = select_device(train_opt["device"])
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    if train_opt["batch_size"] % dist.world:
        raise ValueError(f"train.batch_size {train_opt['batch_size']} (the global batch) must be a multiple of the "
                         f"{dist.world} processes")
    seed_everything(train_opt["seed"])

    parts = load_parts(data_opt, experiment_dir if dist.main else None)
    for role in ("train", "val"):
        if parts[role].targets is None:
            raise DatasetError(f"the {role} set ({parts[role].pairs.dataset}) has no labels: training needs labelled data")
        if not parts[role].pairs:
            raise DatasetError(f"the {role} part is empty: check data.split.ratios {data_opt['split']['ratios']}")
    crop = opt["model"]["img_size"]
    train_set = TrainPairs(parts["train"].pairs, parts["train"].targets, crop, data_opt["flip"], train_opt["seed"])
    check_images(parts["val"].pairs, crop, whole=train_opt["val_crops"] == "whole")
    if parts["test"] is not parts["val"]:  # found now, not by test.py after days of training
        check_images(parts["test"].pairs, crop, whole=opt["test"]["crops"] == "whole")
    log.info(f"{opt['name']}: {len(parts['train'].pairs)} training pairs, {len(parts['val'].pairs)} validation "
             f"pairs ({data_opt['dataset']} at {data_opt['root']}), device {device}, {dist.world} process(es)")

    runtime = Runtime(**opt["runtime"])
    model = runtime.prepare(build_model(opt["model"]), device)
    optimizer, scheduler = make_optimizer(model, train_opt)
    start_epoch, best = 0, {"main": -math.inf}
    if resume_from is not None:
        resume_from, saved = _load_training_checkpoint(resume_from, experiment_dir)
        model.load_saved(saved, resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
        start_epoch, best = saved["epoch"] + 1, saved["best"]
        log.info(f"resumed from {resume_from} after epoch {saved['epoch'] + 1}")
    stepper = model
    if dist.world > 1:
        import torch.distributed as tdist
        from torch.nn.parallel import DistributedDataParallel

        stepper = DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(str(experiment_dir / "tensorboard")) if dist.main else None
    step = start_epoch * math.ceil(len(train_set) / train_opt["batch_size"])
    eval_kwargs = dict(crop_size=crop, crops=train_opt["val_crops"], batch_size=train_opt["batch_size"],
                       num_workers=data_opt["num_workers"], device=device, runtime=runtime)
    try:
        for epoch in range(start_epoch, train_opt["epochs"]):
            model.train()
            train_set.set_epoch(epoch)
            # The order of epoch e depends on (seed, e) alone: a resumed run replays it exactly.
            order = torch.Generator().manual_seed(train_opt["seed"] * 100003 + epoch)
            loader = DataLoader(_Weighted(train_set), batch_sampler=rank_batches(len(train_set),
                                train_opt["batch_size"], dist, order), num_workers=data_opt["num_workers"],
                                pin_memory=device.type == "cuda")
            losses, skipped = [], 0
            start = time.time()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{train_opt['epochs']}", unit="batch", dynamic_ncols=True,
                       disable=None if dist.main else True, leave=False)
            for dist_img, ref_img, target, weight in bar:
                lr = optimizer.param_groups[0]["lr"]
                images = runtime.inputs(dist_img, device), runtime.inputs(ref_img, device)
                if dist.world == 1:
                    loss = train_step(stepper, optimizer, scheduler, *images, target.to(device), runtime=runtime)
                else:
                    n_global = torch.tensor(float(weight.sum()), device=device)
                    tdist.all_reduce(n_global)  # samples in this global batch
                    loss = train_step(stepper, optimizer, scheduler, *images, target.to(device), weight.to(device),
                                      n_global.item() / dist.world, dist.world, runtime)
                if not math.isfinite(loss):
                    where = f"loss is {loss} at epoch {epoch + 1}, step {step}"
                    if train_opt["nonfinite_loss"] == "stop":
                        raise _stopped(f"{where}: stopping (the weights were not updated)", experiment_dir,
                                       "to skip such batches instead, set train.nonfinite_loss=skip")
                    log.warning(f"{where}: batch skipped (train.nonfinite_loss=skip)")
                    skipped += 1
                    step += 1
                    continue
                losses.append(loss)
                step += 1
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if writer and step % train_opt["log_every"] == 0:
                    writer.add_scalar("train/loss", loss, step)
                    writer.add_scalar("train/lr", lr, step)
            if not losses:
                raise _stopped(f"every batch of epoch {epoch + 1} had a non-finite loss: stopping", experiment_dir,
                               "look for bad targets or lower train.lr")
            record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "time_s": time.time() - start}
            if skipped:
                record["skipped_batches"] = skipped
            if (epoch + 1) % train_opt["val_every"] == 0 or epoch + 1 == train_opt["epochs"]:
                pred = _gathered_predict(model, parts["val"], dist, **eval_kwargs)
                metrics = evaluate(pred, parts["val"].targets)
                if writer:
                    for key in ("srocc", "plcc", "krocc", "rmse", "main"):
                        writer.add_scalar(f"val/{key}", metrics[key], epoch + 1)
                record["val"] = summary_line(metrics)
                if metrics["main"] > best["main"]:
                    best = {**metrics, "epoch": epoch + 1}
                    if dist.main:
                        _save(experiment_dir / "best.pth", model, optimizer, scheduler, epoch, best, opt)
                    record["best"] = True
            log.info(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            if dist.main:
                _save(experiment_dir / "latest.pth", model, optimizer, scheduler, epoch, best, opt)
                if (epoch + 1) % train_opt["save_interval"] == 0:
                    _save(experiment_dir / f"epoch_{epoch + 1}.pth", model, optimizer, scheduler, epoch, best, opt)
    finally:
        if writer:
            writer.close()
        if dist.world > 1:
            tdist.destroy_process_group()
    log.info(f"best validation: {summary_line(best) if 'srocc' in best else 'none'} at epoch {best.get('epoch')}")
    return best


def _stopped(what: str, experiment_dir: Path, advice: str) -> FloatingPointError:
    latest = experiment_dir / "latest.pth"
    kept = f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint had been written yet"
    return FloatingPointError(f"{what}; {kept}; {advice}")


def _save(path: Path, model: AHIQ, optimizer, scheduler, epoch: int, best: dict, opt: dict) -> None:
    model.save_checkpoint(path, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                          best=best, rng=_rng_state(), options=opt)


def _load_training_checkpoint(path: Path, experiment_dir: Path) -> tuple[Path, dict]:
    """(path, content) of a training checkpoint; a corrupt latest.pth falls back to the newest good epoch_N.pth."""
    candidates = [path]
    if path.name == "latest.pth":
        epochs = sorted(experiment_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]), reverse=True)
        candidates += epochs
    for candidate in candidates:
        try:
            saved = read_weight_file(candidate)
            if not isinstance(saved, dict) or "optimizer" not in saved:
                raise WeightsError(f"{candidate} is not a training checkpoint of this project")
            return candidate, saved
        except (WeightsError, OSError) as exc:
            log.warning(f"cannot resume from {candidate}: {exc}")
    raise WeightsError(f"no usable checkpoint to resume from in {experiment_dir}")


# ---- testing ---------------------------------------------------------------------------------------------

def _checkpoint_paths(opt: dict, experiment_dir: Path) -> list[Path]:
    given = opt["test"]["checkpoint"]
    paths = []
    for item in given if isinstance(given, list) else [given]:
        path = experiment_dir / f"{item}.pth" if item in ("best", "latest") else Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"test.checkpoint: {path} does not exist (train first, or set "
                                    f"test.checkpoint=<path> or a list of paths for an ensemble)")
        paths.append(path)
    return paths


def run_test(opt: dict, checkpoints_root: str | Path = "checkpoints") -> dict:
    """Score the test part with one checkpoint or an ensemble of them. Labelled: predictions, metrics.json,
    a scatter plot and one summary line. Unlabelled: an NTIRE 2022 submission."""
    from .report import scatter_plot, write_metrics, write_predictions
    from .submission import write_ntire_submission

    test_opt = opt["test"]
    experiment_dir = Path(checkpoints_root) / opt["name"]
    paths = _checkpoint_paths(opt, experiment_dir)
    part = load_parts(opt["data"], roles=("test",))["test"]
    device = select_device(opt["train"]["device"])
    runtime = Runtime(**opt["runtime"])
    models = [runtime.prepare(load_model(p, opt["model"]), device) for p in paths]
    crop = models[0].config["img_size"]
    check_images(part.pairs, crop, whole=test_opt["crops"] == "whole")  # before the first pair is scored
    out_dir = Path(test_opt["output"]) if test_opt["output"] else experiment_dir / "test"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pred = predict(models, part, crop, test_opt["crops"], test_opt["num_crops"], test_opt["seed"],
                   test_opt["batch_size"], opt["data"]["num_workers"], device, progress=True, runtime=runtime)
    seconds_per_image = (time.time() - start) / len(pred)
    names = [p.name for p in part.pairs]
    if part.targets is None:
        sub = test_opt["submission"]
        seconds = sub["runtime"] if sub["runtime"] is not None else seconds_per_image
        gpu = sub["gpu"] if sub["gpu"] is not None else device.type == "cuda"
        zip_path = write_ntire_submission(dict(zip(names, pred.tolist())), out_dir, seconds, gpu,
                                          sub["extra_data"], sub["description"])
        print(f"wrote {zip_path} ({len(names)} images, {seconds_per_image:.3f} s per image)")
        return {"submission": str(zip_path)}
    metrics = evaluate(pred, part.targets)
    write_predictions(out_dir / "results.txt", names, pred)
    write_metrics(out_dir / "metrics.json", metrics, checkpoints=[str(p) for p in paths],
                  dataset=part.pairs.dataset, crops=test_opt["crops"], num_crops=test_opt["num_crops"])
    scatter_plot(out_dir / "scatter.png", pred, part.targets, metrics.get("logistic"),
                 f"{opt['name']} on {part.pairs.dataset}: SROCC {metrics['srocc']:.4f} PLCC {metrics['plcc']:.4f}")
    print(summary_line(metrics))
    return metrics
