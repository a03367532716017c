"""``PairScorer``: what every way of scoring image pairs offers. ``ahiq.Scorer`` and the metric (PyTorch, the
released model or checkpoints), ``OnnxScorer`` (an ONNX export on onnxruntime) and ``BaselineScorer`` (PSNR,
SSIM, ... through piq) implement it; ahiq.scoring.output writes any of them to CSV, journaled and resumable,
and test.py scores its test part with them. No torch."""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import numpy as np

from ahiq.data.pairs import Pairs

OnReference = Callable[[list[int], np.ndarray], None]  # (pair indices, their scores) as each reference is done


@runtime_checkable
class PairScorer(Protocol):
    def check(self, pairs: Pairs) -> None:
        """Every pair's images can be scored (they exist, decode, match their reference's size and hold what
        the scorer needs): one error listing every problem, before the first score."""

    def score_pairs(self, pairs: Pairs, progress: bool | str = False, on_reference: OnReference | None = None,
                    on_maps: Callable | None = None) -> np.ndarray:
        """The scores of ``pairs`` in their order, higher is better (checked first); ``on_reference`` as each
        reference's pairs are done; ``on_maps(indices, maps)`` with their quality maps (where check_maps
        passes); ``progress``: a progress bar (a string: its label)."""

    def settings(self) -> dict:
        """What decides the scores (model files and their digests, crops, precision...): a journaled run is
        resumed only with the same."""

    def describe(self) -> str:
        """How it computes, for a run's first line."""

    def check_maps(self) -> None:
        """Quality maps can be drawn, else a one-line error saying why not."""
