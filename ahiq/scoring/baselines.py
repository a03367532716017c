"""The baseline metrics of the paper's Tables 2 and 4 (declared in ahiq.registry.baselines), scored on the same
pairs as AHIQ: computed by piq (the optional extra ``pip install -e '.[baselines]'``) or here, on the full images
in [0, 1]. A metric whose lower value is better is negated, so that every score here reads "higher is better".
``BaselineScorer`` is a scorer (ahiq.scoring.protocol.PairScorer), so it scores to CSV as ``ahiq.Scorer`` does
(ahiq.scoring.output: progress bar, journal, resume)."""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ahiq.data import Pairs
from ahiq.data.datasets import to_tensor
from ahiq.data.images import read_image
from ahiq.data.pairs import check_images, reference_groups
from ahiq.nn.downloads import locate
from ahiq.registry.baselines import BASELINES, Baseline

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # [1, 3, H, W] twice -> [1]


def psnr(x: torch.Tensor, y: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """10 log10(1 / MSE) of [0, 1] images, in double precision and exactly so (piq's adds 1e-8 to the MSE); identical
    images, whose PSNR is infinite, get MSE 1e-20 (200 dB) so that the statistics stay finite. Per image
    (``reduction`` "none", the one the baselines use)."""
    mse = ((x.double() - y.double()) ** 2).mean(dim=(1, 2, 3))
    return -10 * torch.log10(mse.clamp_min(1e-20))


def build(baseline: Baseline) -> Metric:
    """The metric a baseline's declaration names: its function with its settings, or its learned class built
    once (with the weights torch.hub finds)."""
    module = import_piq() if baseline.module == "piq" else importlib.import_module(baseline.module)
    computed = getattr(module, baseline.compute.split(":")[1])
    if baseline.learned:
        return computed(reduction="none")
    return partial(computed, reduction="none", **baseline.arguments)


def import_piq():
    """piq, or a one-line ImportError saying how to install it."""
    try:
        import piq
    except ImportError:
        raise ImportError("the baseline metrics need the optional package piq: pip install piq (the baselines "
                          "extra)") from None
    return piq


class BaselineScorer:
    """One baseline metric as a scorer of pairs (ahiq.scoring.protocol.PairScorer)."""

    def __init__(self, name: str, device: torch.device, weights: str | os.PathLike | None = None):
        self.name, self.baseline, self.device = name, BASELINES.choice(name, "baseline"), device
        files = self.baseline.weights
        # every file found (or downloaded) before a pair is scored; what is missing: one line naming it
        self.weight_files = dict(zip((f.name for f in files), locate(files, weights))) if files else {}
        with _torch_hub_holding(self.weight_files):
            metric = build(self.baseline)
        self.metric = metric.to(device).eval() if isinstance(metric, torch.nn.Module) else metric

    def check(self, pairs: Pairs) -> None:
        check_images(pairs, self.baseline.min_size, needs=f"{self.name} needs")

    def score_pairs(self, pairs: Pairs, progress: bool | str = False, on_reference=None, on_maps=None) -> np.ndarray:
        """Scores of ``pairs`` in their order, higher is better; ``on_reference(indices, scores)`` as each
        reference is done (its image read once)."""
        self.check(pairs)
        scores = np.full(len(pairs), np.nan)
        sign = -1.0 if self.baseline.lower_is_better else 1.0
        with torch.inference_mode():
            for group in reference_groups(pairs):
                ref = to_tensor(read_image(pairs[group[0]].ref))[None].to(self.device)
                for i in group:
                    dist = to_tensor(read_image(pairs[i].dist))[None].to(self.device)
                    scores[i] = sign * float(self.metric(dist, ref).reshape(-1)[0])
                if on_reference is not None:
                    on_reference(group, scores[group])
        return scores

    def settings(self) -> dict:
        return {"metric": self.name, "settings": self.baseline.summary, "piq": import_piq().__version__,
                "negated": self.baseline.lower_is_better, "weights": [f"{name} {path.stat().st_size} bytes"
                                                                      for name, path in self.weight_files.items()]}

    def describe(self) -> str:
        return f"{self.baseline.label} ({self.baseline.summary}), piq {import_piq().__version__}, device {self.device}"

    def check_maps(self) -> None:
        raise ValueError(f"{self.name} has no quality maps (only AHIQ has)")


@contextlib.contextmanager
def _torch_hub_holding(files: dict[str, Path]):
    """torch.hub's folder, while piq builds a metric, a temporary one whose ``checkpoints/`` holds ``files``
    (name -> path: linked, else copied): piq and torchvision load them from there, and download nothing."""
    if not files:
        yield
        return
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory(prefix="ahiq-hub-") as folder:
        checkpoints = Path(folder) / "checkpoints"
        checkpoints.mkdir()
        for name, path in files.items():
            try:
                os.symlink(path.resolve(), checkpoints / name)
            except OSError:  # no symbolic links (Windows without the privilege)
                shutil.copyfile(path, checkpoints / name)
        torch.hub.set_dir(folder)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)
