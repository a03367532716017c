"""Paired crops and flips: the distorted image and its reference are always cut at the same place."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ahiq.options import DEFAULTS
from ahiq.registry.settings import EVAL_CROPS  # re-exported by ahiq.data


def random_crop_position(height: int, width: int, size: int, rng: np.random.Generator,
                         positions: str = "all") -> tuple[int, int]:
    """Uniform over every valid (top, left): ``all`` includes the last row and column; ``official`` draws
    as the official code's ``np.random.randint(0, height - size)``, which never picks them (an image of
    exactly the crop size, where that call fails, gets position 0)."""
    last = 1 if positions == "all" else 0
    return (int(rng.integers(0, max(1, height - size + last))), int(rng.integers(0, max(1, width - size + last))))


def eval_crop_positions(height: int, width: int, size: int, mode: str, count: int = DEFAULTS["test"]["num_crops"],
                        seed: int = DEFAULTS["test"]["seed"], name: str = "") -> list[tuple[int, int]]:
    """(top, left) of the evaluation crops of one image.

    ``five``: the official order top-left, top-right, bottom-left, bottom-right, centre; ``nine``: then
    left-middle, right-middle, top-middle, bottom-middle; ``random``: ``count`` crops drawn from a generator
    seeded by ``seed`` and ``name`` (the reference image's, in EvalPairs), so a score never depends on batch
    size or order; ``centre``;
    ``whole``: the image itself, which must be exactly ``size`` square.
    """
    EVAL_CROPS.choice(mode, "the evaluation crop mode")
    if height < size or width < size:
        raise ValueError(f"{f'image {name}' if name else 'an image'} is {height}x{width}, smaller than the "
                         f"{size}x{size} crop")
    mid_top, mid_left = height // 2 - size // 2, width // 2 - size // 2
    bottom, right = height - size, width - size
    if mode in ("five", "nine"):
        positions = [(0, 0), (0, right), (bottom, 0), (bottom, right), (mid_top, mid_left)]
        if mode == "nine":
            positions += [(mid_top, 0), (mid_top, right), (0, mid_left), (bottom, mid_left)]
        return positions
    if mode == "random":
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        return [random_crop_position(height, width, size, rng) for _ in range(count)]
    if mode == "centre":
        return [(mid_top, mid_left)]
    if mode == "whole":
        if (height, width) != (size, size):
            raise ValueError(f"crop mode 'whole' needs {size}x{size} images, {name or 'an image'} is {height}x{width}")
        return [(0, 0)]
    raise NotImplementedError(f"the crop mode {mode!r} is declared (ahiq.registry.settings) but has no positions here")


@dataclass(frozen=True)
class CropPlan:
    """Which crops score a pair: ``size`` square, ``mode`` one of EVAL_CROPS, ``count`` random crops seeded by
    ``seed`` and the reference's name (eval_crop_positions). The defaults are test.py's options' (the official
    20 random crops), the crop ensemble of every way of scoring."""

    size: int
    mode: str = DEFAULTS["test"]["crops"]
    count: int = DEFAULTS["test"]["num_crops"]
    seed: int = DEFAULTS["test"]["seed"]

    def windows(self, height: int, width: int, ref_name: str = "") -> np.ndarray:
        """(top, left) of each crop of an image of ``height`` x ``width``: [K, 2]."""
        return np.array(eval_crop_positions(height, width, self.size, self.mode, self.count, self.seed, ref_name),
                        dtype=np.int64).reshape(-1, 2)

    def described(self) -> str:
        """The ensemble in words: "20 random crops, seed 0", "five crops" (of whatever size the model takes)."""
        return f"{self.count} random crops, seed {self.seed}" if self.mode == "random" else f"{self.mode} crops"

    def settings(self) -> list:
        """What decides the crops, for a journaled run's settings: size, mode, and count and seed where random."""
        random = self.mode == "random"
        return [self.size, self.mode, self.count if random else None, self.seed if random else None]

    def cut(self, image, windows: np.ndarray):
        """The crops of ``image`` at ``windows``: a tensor [3, H, W] gives [K, 3, S, S]; a numpy image
        [H, W, 3] gives a list of [S, S, 3] views."""
        s = self.size
        if isinstance(image, np.ndarray):
            return [image[t:t + s, l:l + s] for t, l in windows.tolist()]
        import torch

        return torch.stack([image[:, t:t + s, l:l + s] for t, l in windows.tolist()])


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    return image[top:top + size, left:left + size]


def flip(image: np.ndarray, axis: str) -> np.ndarray:
    """``width``: a horizontal (left-right) flip; ``height``: the official code's flip, which applies
    np.fliplr to a C x H x W array and so turns the image upside down (for bug-for-bug reproduction)."""
    return np.ascontiguousarray(image[:, ::-1] if axis == "width" else image[::-1])
