"""AHIQ as ONNX: ``python -m ahiq export`` writes each model of a checkpoint (or an ensemble) as two graphs with a
dynamic batch, ``model<i>_reference.onnx`` (reference crops -> the features every distorted crop of that
reference is scored against) and ``model<i>_score.onnx`` (distorted crops and their reference crops'
features -> scores), and beside them ``ahiq_onnx.json``: crop size, normalisation, the crop ensemble, each
source checkpoint's SHA-256, every file's size and SHA-256, the format version. ahiq.scoring.onnx_scorer
scores with them, without torch. Exporting needs torch's exporter (the ``onnx`` extra: onnx, onnxscript)
and onnxruntime, with which the export checks itself against PyTorch before it is kept."""
from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ahiq.data.crops import CropPlan
from ahiq.files import json_bytes, release_and_remove, take_lock, write_atomically
from ahiq.messages import create_folder, last_line
from ahiq.nn.downloads import sha256_of
from ahiq.nn.model import AHIQ, ReferenceFeatures
from ahiq.scoring.onnx_scorer import FORMAT, SETTINGS, VERSION, ExportFolderError, OnnxScorer
from ahiq.scoring.scorer import Scorer

OPSET = 19  # DeformConv, the deformable convolution, is ONNX's from opset 19
# The onnx extra's packages, by a command that works wherever ahiq was installed from (a checkout or a wheel).
EXPORTER_INSTALL = "install them with pip install onnx onnxscript 'onnxruntime>=1.25' (the onnx extra)"
EXPORT_TOLERANCE = 1e-4  # onnxruntime against PyTorch on the export's own check; measured far below (tests)


class ReferenceGraph(nn.Module):
    """Reference crops [N, 3, S, S] in [0, 1] -> the head's reduced features [N, D, h, w] (and, where the model has
    the deformable fusion, the offsets [N, 18, S/4, S/4])."""

    def __init__(self, model: AHIQ):
        super().__init__()
        self.model = model

    def forward(self, ref: torch.Tensor):
        features = self.model.reference_features(ref)
        return features.reduced if features.offset is None else (features.reduced, features.offset)


class ScoreGraph(nn.Module):
    """Distorted crops [N, 3, S, S] in [0, 1] and the reference features of their own reference crops (row i
    for crop i) -> scores [N]."""

    def __init__(self, model: AHIQ):
        super().__init__()
        self.model = model

    def forward(self, dist: torch.Tensor, reduced: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.predict_with_reference(dist, ReferenceFeatures(offset, reduced)).score


def export_command(out: Path, **scorer_settings) -> None:
    """``python -m ahiq export``: the exporter's packages and the folder checked before a model is loaded or
    downloaded, then the models of ahiq.Scorer(**scorer_settings) (on the CPU) exported into ``out``."""
    check_exporter()
    check_export_folder(out)
    ensemble = Scorer(device=torch.device("cpu"), **scorer_settings).ensemble
    verified = export(ensemble.models, out, ensemble.plan)["verified"]
    print(f"wrote {out}: {len(ensemble.models)} model(s) as ONNX graphs, {ensemble.plan.described()} by default; "
          f"onnxruntime scored within {verified['max_abs_diff_from_pytorch']:.1e} of PyTorch on {verified['crops']} "
          f"random crops. Score with it: python -m ahiq score --onnx {out} --dist ... --ref ...")


def export(models: Sequence[AHIQ], out: Path, plan: CropPlan) -> dict:
    """Write ``models`` (trained, from AHIQ.from_pretrained: one, or an ensemble) into the folder ``out`` with
    ``plan`` as the crop ensemble the ONNX scorer uses by default; check onnxruntime's scores against
    PyTorch's; return the settings written. A folder that already holds an export is replaced only whole:
    the new one is written beside it, then renamed."""
    sizes = {m.config["img_size"] for m in models}
    if len(sizes) > 1:
        raise ValueError(f"an ensemble's models must take one crop size; these take {sorted(sizes)}")
    out = check_export_folder(out)
    lock_path = out.with_name(f".{out.name}.export.lock")
    lock = take_lock(lock_path, f"--out {out}", "choose another --out")
    try:
        return _export_into(models, out, plan)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile: nothing of the new export is kept
        raise ExportFolderError(f"cannot write the export into {out.parent} ({exc.strerror or exc}); nothing was "
                                f"kept{' (the earlier export there is as it was)' if out.exists() else ''}") from None
    finally:
        release_and_remove(lock, lock_path)


def _export_into(models: Sequence[AHIQ], out: Path, plan: CropPlan) -> dict:
    building = out.with_name(f".{out.name}.exporting")  # this process's: the lock keeps other exports out
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        entries = [_export_model(i, model, building) for i, model in enumerate(models)]
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_of(p)} for p in sorted(building.iterdir())}
        settings = {
            "format": FORMAT, "version": VERSION, "crop_size": plan.size,
            "input": "RGB crops [N, 3, S, S], float32 in [0, 1] (8-bit values / 255); the graphs normalise them as "
                     "the official code, (x - 0.5) / 0.5",
            "crops": {"mode": plan.mode, "count": plan.count, "seed": plan.seed,
                      "positions": "ahiq.data.crops.eval_crop_positions; random crops seeded by the reference file's "
                                   "name"},
            "ensemble": "a pair's score: each model's mean over the pair's crops, then the mean over the models",
            "models": entries, "files": files, "opset": OPSET,
            "exported_by": {"ahiq": _version("ahiq"), "torch": torch.__version__,
                            "onnxruntime": _version("onnxruntime")},
        }
        write_atomically(building / SETTINGS, json_bytes(settings))
        settings["verified"] = _check_against_pytorch(models, building)
        write_atomically(building / SETTINGS, json_bytes(settings))
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    earlier = out.with_name(f".{out.name}.replaced")
    shutil.rmtree(earlier, ignore_errors=True)
    if out.exists():  # the earlier export is set aside, not deleted, until the new one is in its place
        out.rename(earlier)
    building.rename(out)
    shutil.rmtree(earlier, ignore_errors=True)
    return settings


def check_exporter() -> None:
    """torch's ONNX exporter's packages and onnxruntime are importable: checked before a model is loaded."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"exporting to ONNX needs {', '.join(missing)}; {EXPORTER_INSTALL}")


def check_export_folder(out: Path) -> Path:
    """``out`` can take an export: new, empty, or an earlier export (replaced); its parent is created and can be
    written. Returns the folder, a symbolic link followed to the folder it names."""
    out = Path(os.path.realpath(out))
    if out.exists() and not (out.is_dir() and ((out / SETTINGS).is_file() or not any(out.iterdir()))):
        what = "a folder that holds other files than an AHIQ export" if out.is_dir() else "a file"
        raise ValueError(f"--out {out} is {what}; give an empty or new folder (an earlier export there is replaced)")
    create_folder(out.parent, "--out's parent")
    try:
        tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.").cleanup()
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from None
    return out


def deform_conv(input, weight, offset, mask, bias, stride_h: int, stride_w: int, pad_h: int, pad_w: int, dil_h: int,
                dil_w: int, weight_groups: int, offset_groups: int, use_mask: bool):
    """torchvision's deform_conv2d as ONNX's DeformConv (onnxscript): the deformable convolution in one node,
    which onnxruntime runs faster than the nine GridSample taps and the MatMul of the bilinear kernel."""
    from onnxscript import opset19 as op

    return op.DeformConv(input, weight, offset, bias, dilations=[dil_h, dil_w], group=weight_groups,
                         offset_group=offset_groups, pads=[pad_h, pad_w, pad_h, pad_w], strides=[stride_h, stride_w])


def _export_model(index: int, model: AHIQ, folder: Path) -> dict:
    model = copy.deepcopy(model).eval().requires_grad_(False)  # scoring: no checkpointed recomputation in the graph
    if model.fusion is not None:
        model.fusion.deform_impl = "torchvision"  # the kernel deform_conv translates (the same numbers: test_fusion)
    size = model.config["img_size"]
    crops = torch.rand(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        features = model.reference_features(crops)
    feature_names = ["reduced"] if features.offset is None else ["reduced", "offset"]
    feature_values = [features.reduced] if features.offset is None else [features.reduced, features.offset]
    graphs = {}
    for role, graph, inputs, names, outputs in (
            ("reference", ReferenceGraph(model), (crops,), ["ref"], feature_names),
            ("score", ScoreGraph(model), (crops, *feature_values), ["dist", *feature_names], ["score"])):
        path = folder / f"model{index}_{role}.onnx"
        _quietly(lambda: torch.onnx.export(graph.eval(), inputs, str(path), input_names=names, output_names=outputs,
                                           dynamic_shapes={name: {0: batch} for name in names}, opset_version=OPSET,
                                           dynamo=True, external_data=True,
                                           custom_translation_table={torch.ops.torchvision.deform_conv2d.default:
                                                                     deform_conv}), path)
        graphs[role] = {"file": path.name, "inputs": names, "outputs": outputs}
    source = Path(model.source) if getattr(model, "source", None) else None
    return {"source": source.name if source else None, "sha256": sha256_of(source) if source else None,
            "config": dict(model.config), "backbones": list(getattr(model, "backbone_sources", ())), **graphs}


def _quietly(run, path: Path) -> None:
    """torch's exporter, its progress lines and warnings kept back, shown only when it fails."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run()
    except ImportError as exc:
        raise ImportError(f"exporting to ONNX needs torch's exporter and its packages ({exc}); {EXPORTER_INSTALL}") from None
    except OSError:
        raise  # the disk: export() says so in one line
    except Exception as exc:
        sys.stderr.write(said.getvalue())
        raise ExportFolderError(f"torch.onnx.export failed writing {path} ({type(exc).__name__}: "
                                f"{last_line(str(exc))[:200]}; its output above)") from None


def _check_against_pytorch(models: Sequence[AHIQ], folder: Path) -> dict:
    """Score the same random crops with the written graphs (onnxruntime) and with PyTorch: refuse the
    export when they differ by more than EXPORT_TOLERANCE."""
    size = models[0].config["img_size"]
    generator = torch.Generator().manual_seed(0)
    ref, dist = torch.rand(2, 2, 3, size, size, generator=generator)
    onnx = OnnxScorer(folder, threads=torch.get_num_threads())
    largest = 0.0
    for model, sessions in zip(models, onnx.sessions):
        with torch.no_grad():
            expected = model.score_with_reference(dist, model.reference_features(ref)).numpy()
        got = onnx.score_crops(sessions, dist.numpy(), ref.numpy())
        largest = max(largest, float(np.abs(got - expected).max()))
    if not largest <= EXPORT_TOLERANCE:
        raise ExportFolderError(f"the exported graphs in {folder} score {largest:.3g} from PyTorch on the same crops "
                                f"(more than {EXPORT_TOLERANCE}); nothing was kept")
    return {"max_abs_diff_from_pytorch": largest, "crops": 2, "tolerance": EXPORT_TOLERANCE}


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None

