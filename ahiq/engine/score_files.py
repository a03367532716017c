"""``python -m ahiq score``'s run, beside test.py's: the pairs (two files, two folders or a CSV) and the outputs
checked before a model is loaded or downloaded, the scorer built (PyTorch, or an ONNX export on onnxruntime),
then every pair scored to a CSV kept as it is computed (or printed), under torchrun shared by reference."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from ahiq.data.pairs import check_images, pair_files, pairs_from_csv
from ahiq.runtime.job import Job
from ahiq.runtime.signals import Stopped
from ahiq.runtime.threads import applied
from ahiq.scoring.output import check_outputs, score_to_file


def score_files(dist: str | None = None, ref: str | None = None, pairs: str | None = None, out: Path | None = None,
                resume: bool = False, maps: Path | None = None, onnx: Path | None = None, device: str | None = None,
                threads: int | None = None, batch_size: int = 1, **scorer_settings) -> int:
    """Score ``dist`` against ``ref`` (files or folders) or the ``pairs`` CSV into ``out`` (None: printed),
    ``maps`` into a folder; with ``onnx`` on that export, else with a PyTorch ``ahiq.Scorer`` of
    ``scorer_settings`` (its keyword arguments: what is not given takes the Scorer's defaults). The exit
    status: 0, or a stop signal's."""
    job = None
    try:
        if onnx:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("--onnx scores in one process: run it without torchrun")
            job = Job()
        else:
            from ahiq.runtime.distributed import init_distributed

            job, device = init_distributed(device or "auto", "--device")
        chosen = pairs_from_csv(pairs) if pairs else pair_files(dist, ref)
        check_images(chosen, 1)  # unreadable images and unwritable outputs before a model is loaded or downloaded
        check_outputs(out, maps)
        # torch's threads, set before the runtime is resolved (precision: auto measures with them); not
        # onnxruntime's, which it takes as an argument
        with contextlib.nullcontext() if onnx else applied(threads):
            if onnx:
                from ahiq.scoring.onnx_scorer import OnnxScorer

                scorer = OnnxScorer(onnx, batch_size=batch_size, threads=threads, **scorer_settings)
                described = scorer.describe()
            else:
                from ahiq.scoring.scorer import Scorer

                scorer = Scorer(device=device, batch_size=batch_size, **scorer_settings)
                described = f"{scorer.describe()}; {job.world} process(es)"
            score_to_file(scorer, chosen, out, job, resume, progress=True, maps=maps,
                          heading=f"ahiq score: {len(chosen)} pairs; {described}")
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    finally:
        if job is not None and job.world > 1:
            from ahiq.runtime.distributed import destroy

            destroy(job)
    if out and job.main:
        print(f"wrote {len(chosen)} scores to {out}")
    return 0
