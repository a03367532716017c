"""Training (train.py): the official recipe's step, optimiser and schedule, and the loop over epochs with
validation, checkpoints and exact resume, on one process or several under torchrun."""
from __future__ import annotations

import math
import random
import re
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ahiq.data import CropPlan, DatasetError, Parts, TrainPairs, check_parts, load_parts
from ahiq.data.images import read_image
from ahiq.engine.correlations import correlate, summary_line
from ahiq.engine.experiment import (close_logging, load_training_checkpoint, lock_folder, log, nonfinite_loss_error,
                                    remove_stale_temporaries, resume_path, save_training_checkpoint, set_rng_state,
                                    setup_logging)
from ahiq.engine.figures import scatter_figure
from ahiq.files import release_and_remove
from ahiq.nn.model import AHIQ, build_model
from ahiq.options import save_options
from ahiq.registry.datasets import taxonomy
from ahiq.runtime.device import ResolvedRuntime, Runtime
from ahiq.runtime.distributed import Job, Weighted, destroy, init_distributed, rank_batches
from ahiq.runtime.signals import StopSignals, Stopped, ignore_in_workers, shut_down_after
from ahiq.scoring.ensemble import Ensemble, resolve
from ahiq.scoring.inference import maps_of, predict, score_shared
from ahiq.scoring.maps import panel, score_range


def train_step(model, optimizer, scheduler, dist_img, ref_img, target, runtime: ResolvedRuntime, weight=None,
               norm: float = 1.0, world: int = 1, stop: torch.Tensor | None = None) -> float:
    """One step of the official recipe: MSE on normalised targets, optimiser step, scheduler step (every
    iteration, as the official code does). Returns the loss of the whole global batch. The forward pass
    runs under ``runtime``'s precision (the weights and their gradients stay fp32).

    A non-finite loss leaves the weights and the optimiser state untouched (the scheduler still steps, so
    the schedule stays a function of the iteration); the caller decides whether to stop or go on.
    With several processes, ``weight`` (1 for a sample, 0 for padding) and ``norm`` (global batch size /
    number of processes) make the processes' averaged gradient equal to the MSE gradient of the whole
    global batch, whatever the number of processes; every process sees the same global loss, so all of
    them skip or stop together. ``stop`` (several processes): a one-element CPU tensor, 1 where this
    process was asked to stop; reduced in place with the loss, in the same collective, so that every
    process learns whether any was.
    """
    loss = step_loss(model, dist_img, ref_img, target, runtime, weight, norm)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    total = loss.detach()
    if world > 1:
        import torch.distributed as tdist

        vote = stop if stop is not None else torch.zeros(1)
        packed = torch.cat((total.view(1), vote.to(total.device, total.dtype)))
        tdist.all_reduce(packed)
        vote.copy_(packed[1:].to(vote.device, vote.dtype))
        total = packed[0] / world
    value = total.item()
    if math.isfinite(value):
        optimizer.step()
        scheduler.step()
    else:
        with warnings.catch_warnings():  # a skipped first step is not the misuse this warning is about
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            scheduler.step()
    return value


def step_loss(model, dist_img, ref_img, target, runtime: ResolvedRuntime, weight=None, norm: float = 1.0) -> torch.Tensor:
    """The loss of one training step, a tensor on the model's device (train_step's device part before the
    backward pass): the forward pass under ``runtime``'s precision, then the MSE on the normalised targets,
    weighted as train_step says."""
    with runtime.autocast():
        pred = model(dist_img, ref_img).float()
    if weight is None:
        return F.mse_loss(pred, target)
    return (weight * (pred - target) ** 2).sum() / norm


def make_optimizer(model: AHIQ, train_opt: dict):
    """Adam over the trained weights and the cosine schedule, stepped every iteration (the official recipe)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=train_opt["lr"], weight_decay=train_opt["weight_decay"])
    if all(p.device.type == "cpu" for p in params):
        # torch's step asks for the current CUDA stream (a CUDA-graph capture check) whenever CUDA is
        # available, creating a CUDA context in every process of a CPU run on a GPU machine; CPU weights
        # have nothing to capture.
        optimizer._accelerator_graph_capture_health_check = lambda: None
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train_opt["t_max"],
                                                           eta_min=train_opt["eta_min"])
    return optimizer, scheduler


def improves(metrics: dict, best: dict, rule: str) -> bool:
    """Whether validation ``metrics`` beat ``best``: ``main`` (|PLCC| + |SROCC|, the NTIRE 2022 score) is
    higher, or (``official``, as the official train.py) SROCC or PLCC alone is higher."""
    if rule == "official":
        return metrics["srocc"] > best.get("srocc", -math.inf) or metrics["plcc"] > best.get("plcc", -math.inf)
    return metrics["main"] > best["main"]


def make_stepper(model: AHIQ, job: Job, runtime: ResolvedRuntime) -> torch.nn.Module:
    """What a training step calls: the model, wrapped in DistributedDataParallel under several processes,
    and compiled as a whole (wrapper included) when ``runtime.compile`` asks."""
    stepper = model
    if job.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device = runtime.device
        stepper = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return runtime.compiled(stepper)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(opt: dict, checkpoints_root: str | Path = "checkpoints") -> dict:
    """Train with the options ``opt``; returns the best validation metrics. Everything that can be checked
    (options, label files, every image) is checked before the first step. Under torchrun, each process
    trains on its share of every global batch; rank 0 alone writes logs and checkpoints, and holds the
    experiment folder's lock. SIGTERM or SIGINT stops the run at the next step boundary with latest.pth
    written (Stopped); train.resume=auto continues it exactly."""
    job, device = init_distributed(opt["train"]["device"])
    experiment_dir = Path(checkpoints_root) / opt["name"]
    new_folder = job.main and not experiment_dir.exists()
    lock = lock_folder(experiment_dir) if job.main else None  # before anything in the folder is touched
    try:
        with StopSignals() as signals:
            try:
                trainer = Trainer(opt, experiment_dir, job, device, signals)
            except BaseException:
                if new_folder:  # a run that never started leaves no experiment folder behind
                    close_logging()
                    lock.close()
                    lock = None
                    shutil.rmtree(experiment_dir, ignore_errors=True)
                raise
            return trainer.run()
    finally:
        if lock is not None:  # no lock file is left behind: a refused start changes nothing in the folder
            release_and_remove(lock, experiment_dir / ".lock")
        destroy(job)


def checked_parts(opt: dict) -> Parts:
    """The train, validation and test parts of ``opt`` with what a run checks before its first step: the parts
    not empty and labelled, and every image of every part at once (the test part's too: found now, not by
    test.py after days of training)."""
    train_opt, data_opt = opt["train"], opt["data"]
    parts = load_parts(data_opt)
    for role in ("train", "val"):
        if not parts[role].pairs:
            raise DatasetError(f"the {role} part is empty: check data.split.ratios {data_opt['split']['ratios']}")
        if parts[role].targets is None:
            raise DatasetError(f"the {role} set ({parts[role].pairs.dataset}) has no labels: training needs "
                               f"labelled data")
    if train_opt["drop_last"] and len(parts["train"].pairs) < train_opt["batch_size"]:
        raise DatasetError(f"train.drop_last is set and the {len(parts['train'].pairs)} training pairs are fewer "
                           f"than train.batch_size {train_opt['batch_size']}: no batch would be left")
    checked = {"training": (parts["train"].pairs, False),
               "validation": (parts["val"].pairs, train_opt["val_crops"] == "whole")}
    if parts["test"] is not parts["val"]:
        checked["test"] = (parts["test"].pairs, opt["test"]["crops"] == "whole")
    check_parts(checked, opt["model"]["img_size"])
    return parts


class Trainer:
    """One training run: its data, model, optimiser and schedule, and the loop over epochs."""

    def __init__(self, opt: dict, experiment_dir: Path, job: Job, device: torch.device, signals: StopSignals):
        self.opt, self.experiment_dir, self.job, self.device, self.signals = opt, experiment_dir, job, device, signals
        self.map_range = None  # the quality maps' score range in TensorBoard, fixed at the first validation
        train_opt = opt["train"]
        # Everything is checked (the data, the model, a checkpoint to resume) before anything in the folder is
        # written: a run refused at its start leaves the folder as it was (options.yaml, split.json, train.log).
        resume_from = resume_path(train_opt["resume"], experiment_dir)
        if train_opt["batch_size"] % job.world:
            raise ValueError(f"train.batch_size {train_opt['batch_size']} (the global batch) must be a multiple of "
                             f"the {job.world} processes")
        seed_everything(train_opt["seed"])
        self.parts, self.train_set = self._data()
        model = build_model(opt["model"])
        self.runtime = resolve(Runtime(**opt["runtime"]), device, [model])
        self.model = self.runtime.prepare(model)
        self.validation = Ensemble([self.model], CropPlan(opt["model"]["img_size"], train_opt["val_crops"]), self.runtime)
        self.optimizer, self.scheduler = make_optimizer(self.model, train_opt)
        self.start_epoch, self.best, self.partial = 0, {"main": -math.inf}, None
        resumed = self._resume(resume_from) if resume_from is not None else None
        if job.main:
            setup_logging(experiment_dir)
            save_options(opt, experiment_dir / "options.yaml")
            self.parts.save_split(experiment_dir / "split.json")
            remove_stale_temporaries(experiment_dir)
        else:
            log.setLevel("WARNING")
        log.info(f"{opt['name']}: {len(self.parts['train'].pairs)} training pairs, {len(self.parts['val'].pairs)} "
                 f"validation pairs ({opt['data']['dataset']} at {opt['data']['root']}); "
                 f"{self.runtime.describe()}; {job.world} process(es)")
        if resumed:
            log.info(resumed)
        self.stepper = make_stepper(self.model, job, self.runtime)
        batch = train_opt["batch_size"]
        self.steps_per_epoch = len(self.train_set) // batch if train_opt["drop_last"] else -(-len(self.train_set) // batch)
        self.step = self.start_epoch * self.steps_per_epoch + (self.partial["steps"] if self.partial else 0)

    def _data(self):
        """The parts, every image checked, and the training set."""
        data_opt = self.opt["data"]
        parts = checked_parts(self.opt)
        train_set = TrainPairs(parts["train"].pairs, parts["train"].targets, self.opt["model"]["img_size"],
                               data_opt["flip"], self.opt["train"]["seed"], check=False,
                               crop_positions=data_opt["random_crop"])
        return parts, train_set

    def _resume(self, path: Path) -> str:
        """Restore the run from the checkpoint at ``path``; the line to log about it."""
        path, saved = load_training_checkpoint(path, self.experiment_dir)
        self.model.restore(saved, path, advice=f"Resume it with the model options it was trained with (model.* in "
                                                f"{self.experiment_dir / 'options.yaml'}), or start anew under another name=")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"], self.device)
        self.start_epoch, self.best = saved["epoch"] + 1, saved["best"]
        self.partial = saved.get("partial")  # a run stopped within an epoch
        within = f", step {self.partial['steps']} of epoch {self.start_epoch + 1}" if self.partial else ""
        return f"resumed from {path} after epoch {saved['epoch'] + 1}{within}"

    def _save(self, name: str, epoch: int, partial: dict | None = None) -> None:
        """A training checkpoint; ``epoch`` is the last whole epoch (0-based), ``partial`` the steps of the
        next one done so far."""
        if self.job.main:
            save_training_checkpoint(self.experiment_dir / name, self.model, self.optimizer, self.scheduler, epoch,
                                     self.best, self.opt, self.device, **({"partial": partial} if partial else {}))

    def _stop(self, where: str) -> Stopped:
        """The stop every process of the run agreed on, once latest.pth is written. No process exits before
        rank 0 has written it: a launcher that sees one process end may end the others (srun
        --kill-on-bad-exit)."""
        message = (f"stopped by {self.signals.name} {where}; {self.experiment_dir / 'latest.pth'} holds the run so "
                   f"far: continue it with train.resume=auto")
        log.warning(message)
        stop = Stopped(message, self.signals.requested or signal.SIGTERM, logged=True)
        if self.job.world > 1:
            import torch.distributed as tdist

            tdist.barrier()
        return stop

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop (one small collective; at epoch ends only)."""
        if self.job.world == 1:
            return bool(self.signals.requested)
        import torch.distributed as tdist

        flag = torch.tensor([float(bool(self.signals.requested))], device=self.device)
        tdist.all_reduce(flag)
        return flag.item() > 0

    def run(self) -> dict:
        from torch.utils.tensorboard import SummaryWriter

        epochs = self.opt["train"]["epochs"]
        self.writer = SummaryWriter(str(self.experiment_dir / "tensorboard")) if self.job.main else None
        try:
            for epoch in range(self.start_epoch, epochs):
                record = self._epoch(epoch)
                if (epoch + 1) % self.opt["train"]["val_every"] == 0 or epoch + 1 == epochs:
                    self._validate(epoch, record)
                log.info(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
                self._save("latest.pth", epoch)
                if (epoch + 1) % self.opt["train"]["save_interval"] == 0:
                    self._save(f"epoch_{epoch + 1}.pth", epoch)
                if epoch + 1 < epochs and self._stop_agreed():
                    raise self._stop(f"after epoch {epoch + 1}")
        finally:
            if self.writer:
                self.writer.close()
        best = self.best
        log.info(f"best validation: {summary_line(best) if 'srocc' in best else 'none'} at epoch {best.get('epoch')}")
        return best

    def _epoch(self, epoch: int) -> dict:
        """Train one epoch (from the step a stopped run reached); returns its log record."""
        from tqdm import tqdm

        train_opt, job = self.opt["train"], self.job
        self.model.train()
        self.train_set.set_epoch(epoch)
        # The order of epoch e depends on (seed, e) alone: a resumed run replays it exactly.
        order = torch.Generator().manual_seed(train_opt["seed"] * 100003 + epoch)
        plan = rank_batches(len(self.train_set), train_opt["batch_size"], job, order, train_opt["drop_last"])
        partial, self.partial = self.partial or {"steps": 0, "losses": [], "skipped": 0}, None
        self.losses, self.skipped = list(partial["losses"]), partial["skipped"]
        loader = DataLoader(Weighted(self.train_set), batch_sampler=plan[partial["steps"]:],
                            num_workers=self.opt["data"]["num_workers"], pin_memory=self.device.type == "cuda",
                            worker_init_fn=ignore_in_workers)
        start = time.time()
        self.bar = tqdm(total=len(plan), initial=partial["steps"], desc=f"epoch {epoch + 1}/{train_opt['epochs']}",
                        unit="batch", dynamic_ncols=True, disable=None if job.main else True, leave=False)
        with shut_down_after(loader) as loaded:
            for index, batch in enumerate(loaded, start=partial["steps"]):
                self._step(epoch, index, batch)
                if self._stop_requested and index + 1 < len(plan):
                    self._save("latest.pth", epoch - 1, {"steps": index + 1, "losses": self.losses,
                                                         "skipped": self.skipped})
                    raise self._stop(f"at epoch {epoch + 1}, step {index + 1} of {len(plan)}")
        self.bar.close()
        if not self.losses:
            raise nonfinite_loss_error(f"every batch of epoch {epoch + 1} had a non-finite loss: stopping",
                                       self.experiment_dir, "look for bad targets or lower train.lr")
        record = {"epoch": epoch + 1, "loss": float(np.mean(self.losses)), "time_s": time.time() - start}
        if self.skipped:
            record["skipped_batches"] = self.skipped
        return record

    def _step(self, epoch: int, index: int, batch) -> None:
        """One training step on this process's share of global batch ``index``; sets _stop_requested."""
        dist_img, ref_img, target, weight = batch
        train_opt, job, device, runtime = self.opt["train"], self.job, self.device, self.runtime
        lr = self.optimizer.param_groups[0]["lr"]
        images = runtime.inputs(dist_img), runtime.inputs(ref_img)
        # under torchrun, whether to stop is agreed in the loss's collective, voted before the step
        vote = torch.tensor([float(bool(self.signals.requested))])
        if job.world == 1:
            loss = train_step(self.stepper, self.optimizer, self.scheduler, *images, target.to(device), runtime)
        else:
            # the samples in this global batch, known from the batch plan: no collective needed
            n_global = min(train_opt["batch_size"], len(self.train_set) - index * train_opt["batch_size"])
            loss = train_step(self.stepper, self.optimizer, self.scheduler, *images, target.to(device), runtime,
                              weight.to(device), n_global / job.world, job.world, vote)
        self._stop_requested = vote.item() > 0 if job.world > 1 else bool(self.signals.requested)
        self.step += 1
        self.bar.update(1)
        if math.isfinite(loss):
            self.losses.append(loss)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if self.writer and self.step % train_opt["log_every"] == 0:
                self.writer.add_scalar("train/loss", loss, self.step)
                self.writer.add_scalar("train/lr", lr, self.step)
            return
        where = f"loss is {loss} at epoch {epoch + 1}, step {self.step - 1}"
        if train_opt["nonfinite_loss"] == "stop":
            raise nonfinite_loss_error(f"{where}: stopping (the weights were not updated)", self.experiment_dir,
                                       "to skip such batches instead, set train.nonfinite_loss=skip")
        log.warning(f"{where}: batch skipped (train.nonfinite_loss=skip)")
        self.skipped += 1

    def _images(self, pred: np.ndarray, metrics: dict, epoch: int) -> None:
        """TensorBoard (rank 0): the validation scatter plot, and where the model has quality maps the panels
        of four fixed validation pairs, scored again with their maps (four pairs, not a pass over the set), on
        the score range of the first validation, so that the maps are comparable as training goes."""
        part, step = self.parts["val"], epoch + 1
        groups = taxonomy(part.pairs.dataset).groups_of(p.distortion for p in part.pairs)
        self.writer.add_figure("val/scatter", scatter_figure(pred, part.targets, metrics.get("logistic"),
                                                             f"{self.opt['name']}, epoch {step}", metrics, groups),
                               step, close=True)
        if self.model.no_maps:  # a pooling without maps (model.pooling spatial): the scatter plot alone
            return
        shown = sorted(set(np.linspace(0, len(part.pairs) - 1, 4).round().astype(int).tolist()))
        found = maps_of(self.validation, part.pairs, shown)
        image_maps = [m.image_maps() for m in found]  # (score map, weight map, coverage) each
        if self.map_range is None:
            self.map_range = score_range([score_map for score_map, _, _ in image_maps])
        for number, (index, maps, (score_map, weight_map, _)) in enumerate(zip(shown, found, image_maps)):
            picture = panel(read_image(part.pairs[index].dist), score_map, weight_map, self.map_range,
                            f"{part.pairs[index].name}\npredicted {maps.score:.4f}, MOS {part.pairs[index].mos:g}")
            self.writer.add_image(f"val/maps_{number}", picture[..., ::-1].copy(), step, dataformats="HWC")

    def _validate(self, epoch: int, record: dict) -> None:
        """Score the validation part, log it, and write best.pth when it improves."""
        train_opt = self.opt["train"]
        pred = score_shared(lambda pairs, progress: predict(self.validation, pairs, train_opt["batch_size"],
                                                            self.opt["data"]["num_workers"], progress),
                            self.parts["val"].pairs, self.job)
        metrics = correlate(pred, self.parts["val"].targets)
        if self.writer:
            for key in ("srocc", "plcc", "krocc", "rmse", "main"):
                self.writer.add_scalar(f"val/{key}", metrics[key], epoch + 1)
            self._images(pred, metrics, epoch)
        record["val"] = summary_line(metrics)
        if improves(metrics, self.best, train_opt["best"]):
            self.best = {**metrics, "epoch": epoch + 1}
            self._save("best.pth", epoch)
            record["best"] = True
