"""Training (train.py): the official recipe's step, optimiser and schedule, and the loop over epochs with
validation, checkpoints and exact resume, on one process or several under torchrun."""
from __future__ import annotations

import math
import random
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data import DatasetError, TrainPairs, check_images, load_parts
from .distributed import Dist, Weighted, destroy, init_distributed, rank_batches
from .evaluation import predict_shared
from .experiment import (load_training_checkpoint, log, remove_stale_temporaries, resume_path,
                         save_training_checkpoint, set_rng_state, setup_logging, stopped)
from .metrics import evaluate, summary_line
from .model import AHIQ, build_model
from .options import save_options
from .runtime import Runtime


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
    """Adam over the trained weights and the cosine schedule, stepped every iteration (the official recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=train_opt["lr"], weight_decay=train_opt["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train_opt["t_max"],
                                                           eta_min=train_opt["eta_min"])
    return optimizer, scheduler


def improves(metrics: dict, best: dict, rule: str) -> bool:
    """Whether validation ``metrics`` beat ``best``: ``main`` (|PLCC| + |SROCC|, the NTIRE 2022 score) is
    higher, or (``official``, as the official train.py) SROCC or PLCC alone is higher."""
    if rule == "official":
        return metrics["srocc"] > best.get("srocc", -math.inf) or metrics["plcc"] > best.get("plcc", -math.inf)
    return metrics["main"] > best["main"]


def make_stepper(model: AHIQ, dist: Dist, device: torch.device, runtime: Runtime) -> torch.nn.Module:
    """What a training step calls: the model, wrapped in DistributedDataParallel under several processes,
    and compiled as a whole (wrapper included) when ``runtime.compile`` asks."""
    stepper = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        stepper = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return runtime.compiled(stepper)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(opt: dict, checkpoints_root: str | Path = "checkpoints") -> dict:
    """Train with the options ``opt``; returns the best validation metrics. Everything that can be checked
    (options, label files, every image) is checked before the first step. Under torchrun, each process
    trains on its share of every global batch; rank 0 alone writes logs and checkpoints."""
    train_opt, data_opt = opt["train"], opt["data"]
    dist, device = init_distributed(train_opt["device"])
    experiment_dir = Path(checkpoints_root) / opt["name"]
    resume_from = resume_path(train_opt["resume"], experiment_dir)
    if dist.main:
        setup_logging(experiment_dir)
        save_options(opt, experiment_dir / "options.yaml")
        remove_stale_temporaries(experiment_dir)
    else:
        log.setLevel("WARNING")
    if train_opt["batch_size"] % dist.world:
        raise ValueError(f"train.batch_size {train_opt['batch_size']} (the global batch) must be a multiple of the "
                         f"{dist.world} processes")
    seed_everything(train_opt["seed"])

    parts = load_parts(data_opt, experiment_dir if dist.main else None)
    for role in ("train", "val"):
        if not parts[role].pairs:
            raise DatasetError(f"the {role} part is empty: check data.split.ratios {data_opt['split']['ratios']}")
        if parts[role].targets is None:
            raise DatasetError(f"the {role} set ({parts[role].pairs.dataset}) has no labels: training needs labelled data")
    if train_opt["drop_last"] and len(parts["train"].pairs) < train_opt["batch_size"]:
        raise DatasetError(f"train.drop_last is set and the {len(parts['train'].pairs)} training pairs are fewer than "
                           f"train.batch_size {train_opt['batch_size']}: no batch would be left")
    crop = opt["model"]["img_size"]
    train_set = TrainPairs(parts["train"].pairs, parts["train"].targets, crop, data_opt["flip"], train_opt["seed"],
                           crop_positions=data_opt["random_crop"])
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
        resume_from, saved = load_training_checkpoint(resume_from, experiment_dir)
        model.load_saved(saved, resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        start_epoch, best = saved["epoch"] + 1, saved["best"]
        log.info(f"resumed from {resume_from} after epoch {saved['epoch'] + 1}")
    stepper = make_stepper(model, dist, device, runtime)

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(str(experiment_dir / "tensorboard")) if dist.main else None
    steps_per_epoch = (len(train_set) // train_opt["batch_size"] if train_opt["drop_last"]
                       else math.ceil(len(train_set) / train_opt["batch_size"]))
    step = start_epoch * steps_per_epoch
    eval_kwargs = dict(crop_size=crop, crops=train_opt["val_crops"], batch_size=train_opt["batch_size"],
                       num_workers=data_opt["num_workers"], device=device, runtime=runtime)
    try:
        for epoch in range(start_epoch, train_opt["epochs"]):
            model.train()
            train_set.set_epoch(epoch)
            # The order of epoch e depends on (seed, e) alone: a resumed run replays it exactly.
            order = torch.Generator().manual_seed(train_opt["seed"] * 100003 + epoch)
            loader = DataLoader(Weighted(train_set), batch_sampler=rank_batches(len(train_set),
                                train_opt["batch_size"], dist, order, train_opt["drop_last"]), num_workers=data_opt["num_workers"],
                                pin_memory=device.type == "cuda")
            losses, skipped = [], 0
            start = time.time()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{train_opt['epochs']}", unit="batch", dynamic_ncols=True,
                       disable=None if dist.main else True, leave=False)
            for index, (dist_img, ref_img, target, weight) in enumerate(bar):
                lr = optimizer.param_groups[0]["lr"]
                images = runtime.inputs(dist_img, device), runtime.inputs(ref_img, device)
                if dist.world == 1:
                    loss = train_step(stepper, optimizer, scheduler, *images, target.to(device), runtime=runtime)
                else:
                    # the samples in this global batch, known from the batch plan: no collective needed
                    n_global = min(train_opt["batch_size"], len(train_set) - index * train_opt["batch_size"])
                    loss = train_step(stepper, optimizer, scheduler, *images, target.to(device), weight.to(device),
                                      n_global / dist.world, dist.world, runtime)
                if not math.isfinite(loss):
                    where = f"loss is {loss} at epoch {epoch + 1}, step {step}"
                    if train_opt["nonfinite_loss"] == "stop":
                        raise stopped(f"{where}: stopping (the weights were not updated)", experiment_dir,
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
                raise stopped(f"every batch of epoch {epoch + 1} had a non-finite loss: stopping", experiment_dir,
                              "look for bad targets or lower train.lr")
            record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "time_s": time.time() - start}
            if skipped:
                record["skipped_batches"] = skipped
            if (epoch + 1) % train_opt["val_every"] == 0 or epoch + 1 == train_opt["epochs"]:
                pred = predict_shared([model], parts["val"], dist, **eval_kwargs)
                metrics = evaluate(pred, parts["val"].targets)
                if writer:
                    for key in ("srocc", "plcc", "krocc", "rmse", "main"):
                        writer.add_scalar(f"val/{key}", metrics[key], epoch + 1)
                record["val"] = summary_line(metrics)
                if improves(metrics, best, train_opt["best"]):
                    best = {**metrics, "epoch": epoch + 1}
                    if dist.main:
                        save_training_checkpoint(experiment_dir / "best.pth", model, optimizer, scheduler, epoch,
                                                 best, opt)
                    record["best"] = True
            log.info(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            if dist.main:
                save_training_checkpoint(experiment_dir / "latest.pth", model, optimizer, scheduler, epoch, best, opt)
                if (epoch + 1) % train_opt["save_interval"] == 0:
                    save_training_checkpoint(experiment_dir / f"epoch_{epoch + 1}.pth", model, optimizer, scheduler,
                                             epoch, best, opt)
    finally:
        if writer:
            writer.close()
        destroy(dist)
    log.info(f"best validation: {summary_line(best) if 'srocc' in best else 'none'} at epoch {best.get('epoch')}")
    return best
