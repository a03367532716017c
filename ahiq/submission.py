"""NTIRE 2022 Perceptual IQA Challenge (full-reference track) submissions for CodaLab."""
from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import Mapping


def write_ntire_submission(scores: Mapping[str, float], out_dir: str | os.PathLike, runtime: float, gpu: bool,
                           extra_data: bool, description: str) -> Path:
    """Write ``output.txt`` (``name,score`` per image, sorted by name), ``readme.txt`` (CodaLab's five lines)
    and ``submission.zip`` holding just those two files at its root; returns the zip's path."""
    bad = [name for name, score in scores.items() if not math.isfinite(score)]
    if not scores or bad:
        raise ValueError(f"cannot submit: {'no scores' if not scores else f'non-finite scores for {bad[:5]}'}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = "".join(f"{name},{scores[name]:f}\n" for name in sorted(scores))
    readme = (f"runtime per image [s] : {runtime:.4f}\n"
              f"CPU[1] / GPU[0] : {0 if gpu else 1}\n"
              f"Extra Data [1] / No Extra Data [0] : {1 if extra_data else 0}\n"
              f"Other description : {' '.join(description.split())}\n"
              f"Full-Reference [1] / Non-Reference [0] : 1\n")
    (out_dir / "output.txt").write_text(output)
    (out_dir / "readme.txt").write_text(readme)
    path = out_dir / "submission.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", readme)
        zf.writestr("output.txt", output)
    return path
