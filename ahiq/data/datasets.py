"""Torch datasets of image pairs for training and evaluation, and their targets."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ahiq.data.crops import CropPlan, crop, flip, random_crop_position
from ahiq.data.images import read_image
from ahiq.data.pairs import DatasetError, Pairs, check_images
from ahiq.registry.settings import FLIPS, RANDOM_CROPS


class TargetScale:
    """Published score <-> training target: min-max normalised over a labelled set, turned so that higher is
    better. Targets of one dataset share one scale across its train/val/test parts."""

    def __init__(self, low: float, high: float, higher_is_better: bool):
        if not high > low:
            raise DatasetError(f"scores span no range ({low} to {high}): cannot normalise them")
        self.low, self.high, self.higher_is_better = float(low), float(high), bool(higher_is_better)

    @classmethod
    def fit(cls, pairs: Pairs) -> "TargetScale":
        mos = np.array([p.mos for p in pairs], dtype=float)
        if not len(mos) or np.isnan(mos).any():
            raise DatasetError("a target scale needs labelled pairs")
        return cls(mos.min(), mos.max(), pairs.higher_is_better)

    def to_target(self, mos):
        t = (np.asarray(mos, dtype=float) - self.low) / (self.high - self.low)
        return t if self.higher_is_better else 1.0 - t

    def to_mos(self, target):
        t = np.asarray(target, dtype=float)
        return (t if self.higher_is_better else 1.0 - t) * (self.high - self.low) + self.low

    def state(self) -> dict:
        return {"low": self.low, "high": self.high, "higher_is_better": self.higher_is_better}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)


class TrainPairs(Dataset):
    """One random crop at the same position in both images, and a paired random flip. ``flip_axis`` and
    ``crop_positions`` ("all" or "official", see random_crop_position) reproduce the official code's
    quirks on demand.

    The randomness of sample i in epoch e comes from a generator seeded by (seed, e, i): the same crops in
    every worker layout, and a resumed run sees exactly the crops an uninterrupted one would.
    """

    def __init__(self, pairs: Pairs, targets: Sequence[float], crop_size: int = 224, flip_axis: str | None = "width",
                 seed: int = 0, check: bool = True, crop_positions: str = "all"):
        FLIPS.choice(flip_axis, "flip_axis")
        self.crop_positions = RANDOM_CROPS.choice(crop_positions, "crop_positions").name
        if check:
            check_images(pairs, crop_size)
        self.pairs, self.crop_size, self.flip_axis, self.seed = list(pairs), crop_size, flip_axis, seed
        if len(targets) != len(pairs):
            raise ValueError(f"{len(targets)} targets for {len(pairs)} pairs")
        self.targets = np.asarray(targets, dtype=np.float32)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        dist, ref = read_image(pair.dist), read_image(pair.ref)
        if dist.shape != ref.shape:
            raise DatasetError(f"{pair.dist} {dist.shape[:2]} and its reference {pair.ref} {ref.shape[:2]} differ in size")
        top, left = random_crop_position(dist.shape[0], dist.shape[1], self.crop_size, rng, self.crop_positions)
        dist, ref = crop(dist, top, left, self.crop_size), crop(ref, top, left, self.crop_size)
        if self.flip_axis and rng.random() < 0.5:
            dist, ref = flip(dist, self.flip_axis), flip(ref, self.flip_axis)
        return to_tensor(dist), to_tensor(ref), torch.tensor(self.targets[index])


class EvalPairs(Dataset):
    """Decoded pairs for evaluation: the distorted image and its reference as [3, H, W] tensors in [0, 1],
    the published score (NaN when unlabelled) and the pair's index. The crops are cut where they are scored
    (ahiq.scoring), from the plan."""

    def __init__(self, pairs: Pairs, plan: CropPlan, check: bool = True, reference_for: set[int] | None = None):
        """``reference_for``: the pairs whose reference image is needed (None: all); the others return an
        empty reference tensor, so a reference shared by many pairs is read once. ``plan``: what the images
        are checked against."""
        if check:
            check_images(pairs, plan.size, whole=plan.mode == "whole")
        self.pairs, self.reference_for = list(pairs), reference_for

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        pair = self.pairs[index]
        dist = read_image(pair.dist)
        mos = torch.tensor(pair.mos, dtype=torch.float64)
        if self.reference_for is not None and index not in self.reference_for:
            return to_tensor(dist), torch.empty(0), mos, index
        ref = read_image(pair.ref)
        if dist.shape != ref.shape:
            raise DatasetError(f"{pair.dist} {dist.shape[:2]} and its reference {pair.ref} {ref.shape[:2]} differ in size")
        return to_tensor(dist), to_tensor(ref), mos, index
