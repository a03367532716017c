"""The baseline metrics of the paper's Tables 2 and 4, scored on the same pairs as AHIQ: one table of them,
computed by piq (the optional extra ``pip install -e '.[baselines]'``) on the full images in [0, 1], with
the settings of piq's functions as written in BASELINES. A metric whose lower value is better is negated, so
that every score here reads "higher is better". ``BaselineScorer`` scores pairs as ``ahiq.Scorer`` does
(ahiq.scoring.output: progress bar, journal, resume)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
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
from ahiq.nn.zoo import METRIC_WEIGHTS

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # [1, 3, H, W] twice -> [1]


@dataclass(frozen=True)
class Baseline:
    label: str                       # as the paper's tables name it
    build: Callable[[], Metric]      # the metric (the learned ones built once, with their weights)
    lower_is_better: bool
    min_size: int                    # the smallest image side piq computes it on
    settings: str                    # what is computed, for the docs and the resume check


def _function(name: str, **kwargs) -> Callable[[], Metric]:
    return lambda: partial(getattr(import_piq(), name), reduction="none", **kwargs)


def _learned(name: str) -> Callable[[], Metric]:
    return lambda: getattr(import_piq(), name)(reduction="none")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """10 log10(1 / MSE) of [0, 1] images, in double precision and exactly so (piq's adds 1e-8 to the MSE); identical
    images, whose PSNR is infinite, get MSE 1e-20 (200 dB) so that the statistics stay finite."""
    mse = ((x.double() - y.double()) ** 2).mean(dim=(1, 2, 3))
    return -10 * torch.log10(mse.clamp_min(1e-20))


BASELINES: dict[str, Baseline] = {
    "psnr": Baseline("PSNR", lambda: psnr, False, 1,
                     "10 log10(1 / MSE) in double precision, MSE over the RGB channels of [0, 1] images; identical "
                     "images 200 dB"),
    "ssim": Baseline("SSIM", _function("ssim", data_range=1.0), False, 11,
                     "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, average-pooled by round(min(H, W) / 256) "
                     "first as Wang et al.'s code; per RGB channel, averaged"),
    "ms_ssim": Baseline("MS-SSIM", _function("multi_scale_ssim", data_range=1.0), False, 161,
                        "five scales with Wang et al.'s 2003 weights, window 11, sigma 1.5; per RGB channel"),
    "fsim": Baseline("FSIMc", _function("fsim", data_range=1.0, chromatic=True), False, 2,
                     "FSIM with chrominance (FSIMc), average-pooled by round(min(H, W) / 256) first"),
    "vsi": Baseline("VSI", _function("vsi", data_range=1.0), False, 1, "piq's defaults (Zhang et al. 2014)"),
    "gmsd": Baseline("GMSD", _function("gmsd", data_range=1.0), True, 1,
                     "on luminance, average-pooled by 2, T = 170 / 255^2"),
    "vif_p": Baseline("VIF", _function("vif_p", data_range=1.0), False, 41,
                      "pixel-domain VIF (VIFp), sigma_n^2 = 2, on luminance; not the wavelet-domain VIF of "
                      "Sheikh and Bovik 2006"),
    "lpips": Baseline("LPIPS-VGG", _learned("LPIPS"), True, 32,
                      "VGG16 with LPIPS v0.1 linear weights, ImageNet normalisation, full image"),
    "dists": Baseline("DISTS", _learned("DISTS"), True, 1,
                      "VGG16 with L2 pooling and DISTS weights; images resized to 256 on the shorter side when "
                      "larger"),
}


def import_piq():
    """piq, or a one-line ImportError saying how to install it."""
    try:
        import piq
    except ImportError:
        raise ImportError("the baseline metrics need the optional package piq: pip install piq (the baselines "
                          "extra)") from None
    return piq


class BaselineScorer:
    """One baseline metric as a scorer of pairs (the interface of ahiq.Scorer that ahiq.scoring.output uses)."""

    def __init__(self, name: str, device: torch.device, weights: str | os.PathLike | None = None):
        self.name, self.baseline, self.device = name, BASELINES[name], device
        files = METRIC_WEIGHTS.get(name, ())
        # every file found (or downloaded) before a pair is scored; what is missing: one line naming it
        self.weight_files = dict(zip((f.name for f in files), locate(files, weights))) if files else {}
        with _torch_hub_holding(self.weight_files):
            metric = self.baseline.build()
        self.metric = metric.to(device).eval() if isinstance(metric, torch.nn.Module) else metric

    def check(self, pairs: Pairs) -> None:
        check_images(pairs, self.baseline.min_size, needs=f"{self.name} needs")

    def score_pairs(self, pairs: Pairs, progress: bool = False, on_reference=None, on_maps=None) -> np.ndarray:
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
        return {"metric": self.name, "settings": self.baseline.settings, "piq": import_piq().__version__,
                "negated": self.baseline.lower_is_better, "weights": [f"{name} {path.stat().st_size} bytes"
                                                                      for name, path in self.weight_files.items()]}

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
