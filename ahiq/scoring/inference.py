"""Crop-ensemble prediction of image files: each reference crop's features are computed once for all its
distorted images; whole references shared out over torchrun's processes; the quality maps of chosen pairs."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from ahiq.data import EvalPairs, Pairs
from ahiq.data.pairs import reference_groups, reference_shares
from ahiq.runtime.distributed import Job, gather_object
from ahiq.runtime.signals import ignore_in_workers, shut_down_after
from ahiq.scoring.ensemble import Ensemble, out_of_memory_advice
from ahiq.scoring.maps import QualityMaps


@torch.no_grad()
def predict(ensemble: Ensemble, pairs: Sequence, batch_size: int = 2, num_workers: int = 0,
            progress: bool | str = False, on_reference: Callable[[list[int], np.ndarray], None] | None = None,
            on_maps: Callable[[list[int], list[QualityMaps]], None] | None = None) -> np.ndarray:
    """Per-pair scores of image files: Ensemble.score_group on the decoded images, in the order of ``pairs``; no
    pair is dropped. Images must have been checked (check_images) by the caller.

    The files are decoded in a DataLoader and taken grouped by reference: the reference's crop features are
    computed once and passed on to the next batches of its distorted images, which are scored ``batch_size``
    at a time (a batch never mixes references, so a pair's score does not depend on the other references
    scored). ``on_reference(indices, scores)`` is called as each reference's pairs are done; ``on_maps(indices,
    maps)`` with each batch's QualityMaps (one model only); ``progress``: a progress bar (a string: its
    label)."""
    if on_maps is not None:
        ensemble.check_maps()
    plan, device = ensemble.plan, ensemble.runtime.device
    groups = reference_groups(pairs)
    batched = [group[a:a + batch_size] for group in groups for a in range(0, len(group), batch_size)]
    ends_reference = [a + batch_size >= len(group) for group in groups for a in range(0, len(group), batch_size)]
    dataset = EvalPairs(pairs, plan, check=False, reference_for={group[0] for group in groups})
    # Batches of ragged items: the reference image comes with the first pair of each reference only.
    loader = DataLoader(dataset, batch_sampler=batched, num_workers=num_workers, collate_fn=_as_they_are,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_in_workers)
    for m in ensemble.models:
        m.eval()
    out = np.empty(len(pairs))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pairs), desc=progress if isinstance(progress, str) else "predict", unit="pair",
                   dynamic_ncols=True, disable=None)
    features, done = None, []  # the current reference's features, and its pairs scored so far
    with shut_down_after(loader) as loaded:  # workers shut down at the end, also by an exception
        for items, last in zip(loaded, ends_reference):
            indices = [item[3] for item in items]
            ref = items[0][1] if items[0][1].numel() else None
            if ref is not None:
                features = None  # a new reference
            with out_of_memory_advice(device, len(items), len(plan.windows(*items[0][0].shape[-2:])),
                                      ensemble.runtime.crops(),
                                      "test.batch_size; train.batch_size during validation; --batch-size"):
                scored = ensemble.score_group(ref, [item[0] for item in items], Path(pairs[indices[0]].ref).name,
                                              maps=on_maps is not None, features=features)
            features = scored.features
            out[indices] = scored.scores.double().cpu().numpy()
            if on_maps is not None:
                on_maps(indices, scored.maps)
            done += indices
            if bar is not None:
                bar.update(len(indices))
            if last:
                if on_reference is not None:
                    on_reference(done, out[done])
                done = []
    if bar is not None:
        bar.close()
    return out


def _as_they_are(items: list) -> list:
    """A DataLoader batch of ragged items, uncollated (a module-level function: spawned workers, macOS's and
    Windows' default, receive it pickled)."""
    return items


def score_shared(score: Callable[[Pairs, bool | str], np.ndarray], pairs: Pairs, job: Job,
                 progress: bool = False) -> np.ndarray:
    """``score(pairs, progress)`` (a scorer's score_pairs, or predict) with whole references shared out over the
    processes and the scores gathered on every process. With a progress bar, each process shows its own
    share."""
    if job.world == 1:
        return score(pairs, progress)
    mine = reference_shares(pairs, job.world)[job.rank]
    label = f"score (process {job.rank} of {job.world}: its share)" if progress else False
    scores = score(Pairs([pairs[i] for i in mine], pairs.higher_is_better, pairs.dataset), label) if mine else np.empty(0)
    out = np.empty(len(pairs))
    for indices, values in gather_object((mine, scores), job):
        out[indices] = values
    return out


def maps_of(ensemble: Ensemble, pairs: Sequence, indices: Sequence[int]) -> list[QualityMaps]:
    """The QualityMaps of ``pairs[indices]`` (ahiq.scoring.maps): those pairs scored with their maps (one
    model)."""
    found: dict[int, QualityMaps] = {}
    chosen = Pairs([pairs[i] for i in indices])
    predict(ensemble, chosen, 1, on_maps=lambda batch, maps: found.update(zip(batch, maps)))
    return [found[i] for i in range(len(indices))]
