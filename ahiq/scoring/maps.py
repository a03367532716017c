"""Where AHIQ sees the damage. For every patch of a crop the head predicts a quality score and an attention
weight, and the crop's score is their weighted mean; the pair's score is the mean over its crops. Here the
crops' maps are brought to the image: each crop's maps, upsampled to its window, averaged where windows
overlap; a pixel that no crop covered is NaN, never invented."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

ONE_MODEL = "quality maps come from one model: give one checkpoint, not an ensemble"


def check_maps(models, option: str = "") -> None:
    """Quality maps come from one model whose score is their weighted mean (its pooling has them, AHIQ.no_maps):
    a one-line error otherwise, prefixed by the ``option`` that asked for them."""
    prefix = f"{option}: " if option else ""
    if len(models) > 1:
        raise ValueError(prefix + ONE_MODEL)
    if models[0].no_maps:
        raise ValueError(prefix + models[0].no_maps)


@dataclass
class QualityMaps:
    """One pair's maps. ``crop_score_maps``/``crop_weight_maps`` [K, h, w] on the ViT grid and ``windows``
    [K, 2] (top, left) of the ``crop_size`` crops reproduce the score; the image-level arrays [H, W]
    (float32) are for looking at."""

    score: float
    crop_score_maps: np.ndarray
    crop_weight_maps: np.ndarray
    windows: np.ndarray
    crop_size: int
    image_size: tuple[int, int]

    def crop_scores(self) -> np.ndarray:
        """Each crop's score: the weighted mean of its score map (the model's own pooling)."""
        w = self.crop_weight_maps.astype(np.float64)
        return (self.crop_score_maps * w).sum(axis=(1, 2)) / w.sum(axis=(1, 2))

    def image_maps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score_map, weight_map, coverage) at image resolution: the mean over the crops covering each pixel,
        NaN where none does; coverage counts them."""
        height, width = self.image_size
        total = np.zeros((2, height, width))
        coverage = np.zeros((height, width))
        cell = self.crop_size // self.crop_score_maps.shape[-1]  # pixels per patch: the ViT's patch size
        for score_map, weight_map, (top, left) in zip(self.crop_score_maps, self.crop_weight_maps, self.windows):
            window = (slice(top, top + self.crop_size), slice(left, left + self.crop_size))
            for channel, grid in enumerate((score_map, weight_map)):
                total[(channel, *window)] += np.kron(grid, np.ones((cell, cell)))
            coverage[window] += 1
        with np.errstate(invalid="ignore"):
            mean = (total / coverage).astype(np.float32)  # 0 / 0: NaN where no crop covered
        return mean[0], mean[1], coverage.astype(np.float32)

    def save(self, path: Path) -> None:
        score_map, weight_map, coverage = self.image_maps()
        np.savez_compressed(path, score=np.float64(self.score), score_map=score_map, weight_map=weight_map,
                            coverage=coverage, crop_score_maps=self.crop_score_maps.astype(np.float32),
                            crop_weight_maps=self.crop_weight_maps.astype(np.float32), windows=self.windows,
                            crop_size=np.int64(self.crop_size))


MAP_OPACITY = 0.85  # the maps over a faint copy of the image: the colours carry the information


def score_range(score_maps) -> tuple[float, float]:
    """One colour scale for the score maps of a run, so that their panels compare: the 1st to 99th percentile of
    every covered pixel ((0, 1) when none is)."""
    values = np.concatenate([np.asarray(m, np.float64)[np.isfinite(m)] for m in score_maps] or [np.empty(0)])
    return (float(np.percentile(values, 1)), float(np.percentile(values, 99))) if values.size else (0.0, 1.0)


def weighted_scores(score_map: np.ndarray, weight_map: np.ndarray) -> np.ndarray:
    """What each pixel adds to the score: score x weight / the mean weight over the covered pixels. Its mean
    over those pixels is the weighted mean of the score map, the way the model pools it, so it reads on the
    score's scale: high where a region the model looks at scores high; low where the score is low or the model
    does not look (weight near 0)."""
    with np.errstate(invalid="ignore"):
        return (score_map * weight_map / np.nanmean(weight_map)).astype(np.float32)


def panel(image: np.ndarray, score_map: np.ndarray, weight_map: np.ndarray, scale: tuple[float, float],
          title: str) -> np.ndarray:
    """A BGR picture: the distorted image (RGB uint8 [H, W, 3]), then the score map, the weight map and the
    weighted scores (weighted_scores) in viridis (perceptually uniform; ``scale`` (score_range) fixed per run so
    that panels compare, for the score map and the weighted scores; weights in [0, 1]) over a faint copy of the
    image, each with a legend; uncovered pixels hatched; ``title`` above (its lines split at newlines)."""
    enlarged = -(-256 // image.shape[1])  # small images enlarged (nearest), so that the legends fit
    if enlarged > 1:
        image, score_map, weight_map = (np.repeat(np.repeat(a, enlarged, 0), enlarged, 1)
                                        for a in (image, score_map, weight_map))
    base = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    tiles = [_with_legend(base, None, None)]
    for values, (low, high), name in ((score_map, scale, "score"), (weight_map, (0.0, 1.0), "weight"),
                                      (weighted_scores(score_map, weight_map), scale, "score x weight")):
        tiles.append(_with_legend(_overlay(base, values, low, high), (low, high), name))
    gap = np.full((tiles[0].shape[0], 8, 3), 255, np.uint8)
    body = np.hstack([part for tile in tiles for part in (gap, tile)][1:])
    lines = title.splitlines() or [""]
    header = np.full((8 + 20 * len(lines), body.shape[1], 3), 255, np.uint8)
    for number, line in enumerate(lines):
        cv2.putText(header, line, (6, 20 + 20 * number), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([header, body])


def _overlay(base: np.ndarray, values: np.ndarray, low: float, high: float) -> np.ndarray:
    covered = np.isfinite(values)
    scaled = np.clip((np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12), 0, 1)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    out = cv2.addWeighted(base, 1 - MAP_OPACITY, colours, MAP_OPACITY, 0)
    hatch = (np.add.outer(np.arange(values.shape[0]), np.arange(values.shape[1])) % 8) < 2
    out[~covered] = base[~covered]
    out[~covered & hatch] = (128, 128, 128)
    return out


def _with_legend(tile: np.ndarray, value_range: tuple[float, float] | None, name: str | None) -> np.ndarray:
    legend = np.full((30, tile.shape[1], 3), 255, np.uint8)
    if value_range is not None:
        bar = np.linspace(0, 255, max(tile.shape[1] - 12, 2)).astype(np.uint8)[None].repeat(8, 0)
        legend[2:10, 6:6 + bar.shape[1]] = cv2.applyColorMap(bar, cv2.COLORMAP_VIRIDIS)
        text = f"{name} {value_range[0]:.2f} .. {value_range[1]:.2f}"
        cv2.putText(legend, text, (6, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([tile, legend])


def map_file_stems(names: list[str]) -> list[str]:
    """A file stem per pair for ``--maps``: the distorted image's name, with the pair's number when two
    pairs share it."""
    stems = [Path(name).stem for name in names]
    repeated = {s for s in stems if stems.count(s) > 1}
    return [f"{s}_{i}" if s in repeated else s for i, s in enumerate(stems)]


def write_panels(folder: Path, pairs, stems: list[str] | None = None, titles: list[str] | None = None) -> None:
    """A panel ``<stem>.png`` for every pair whose ``<stem>.npz`` is in ``folder`` (stems: map_file_stems by
    default), with one score range for all of them (the 1st to 99th percentile of every covered pixel);
    ``titles`` (default: the stem and the score) above each."""
    from ahiq.data.images import read_image

    stems = stems or map_file_stems([p.name for p in pairs])
    saved = {stem: np.load(folder / f"{stem}.npz") for stem in stems if (folder / f"{stem}.npz").is_file()}
    shared = score_range([m["score_map"] for m in saved.values()])
    for number, (stem, pair) in enumerate(zip(stems, pairs)):
        if stem in saved:
            maps = saved[stem]
            title = titles[number] if titles else f"{stem}  score {float(maps['score']):.4f}"
            picture = panel(read_image(pair.dist), maps["score_map"], maps["weight_map"], shared, title)
            cv2.imwrite(str(folder / f"{stem}.png"), picture)
