"""Scoring with an ONNX export of AHIQ (``python -m ahiq export``) and onnxruntime, without torch: numpy,
OpenCV and onnxruntime only. The same pairs, checks, crops and CSV output as the PyTorch scorer
(``python -m ahiq score --onnx DIR``); each reference's crops go through the reference graph once, and their
features serve all its distorted images."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ahiq.data.crops import CropPlan
from ahiq.data.images import read_image
from ahiq.data.pairs import Pairs, check_images, pair_files, reference_groups
from ahiq.registry.settings import EVAL_CROPS
from ahiq.registry.variants import FUSIONS
from ahiq.runtime.memory import cpu_crops
from ahiq.runtime.threads import choose_threads
from ahiq.scoring.cost import crop_cost

FORMAT = "ahiq-onnx"
VERSION = 1
SETTINGS = "ahiq_onnx.json"
DEFORM_CONV_ONNXRUNTIME = (1, 25)  # the first onnxruntime that runs ONNX's DeformConv (1.24 refuses it)
PathLike = str | os.PathLike


class ExportFolderError(ValueError):
    """An export folder that cannot be used: the message names the file and what to do."""


def read_settings(folder: Path) -> dict:
    """The settings of the export in ``folder``, every file it lists there with its size and SHA-256."""
    from ahiq.nn.downloads import sha256_of

    if not folder.is_dir():
        raise ExportFolderError(f"--onnx {folder} is not a folder; make one with python -m ahiq export --out {folder}")
    path = folder / SETTINGS
    if not path.is_file():
        raise ExportFolderError(f"{folder} holds no {SETTINGS}: not an AHIQ export (or an incomplete one); make one "
                                f"with python -m ahiq export --out {folder}")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportFolderError(f"{path} cannot be read ({type(exc).__name__}: {exc}); export again") from None
    _check_settings(settings, path)
    for name, expected in settings["files"].items():
        file = folder / name
        if not file.is_file():
            raise ExportFolderError(f"{file} is missing (the export is incomplete): export again")
        if file.stat().st_size != expected["size"] or sha256_of(file) != expected["sha256"]:
            raise ExportFolderError(f"{file} is damaged (not the bytes {SETTINGS} lists for it): export again")
    return settings


def _check_settings(settings, path: Path) -> None:
    """Every field the scorer reads, with its type and range: one ExportFolderError naming the first wrong one."""
    def wrong(field: str, value, needs: str) -> ExportFolderError:
        shown = json.dumps(value)[:60] if not isinstance(value, _Missing) else "nothing (the field is missing)"
        return ExportFolderError(f"{path}: field '{field}' must be {needs}, got {shown}; export again (python -m ahiq "
                                 f"export) or restore the file")

    def field(parent, key: str):
        return parent.get(key, _Missing()) if isinstance(parent, dict) else _Missing()

    def whole(value, field_name: str, low: int) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise wrong(field_name, value, f"a whole number of at least {low}")

    if not isinstance(settings, dict):
        raise wrong("(the whole file)", settings, "a JSON object")
    fmt, version = field(settings, "format"), field(settings, "version")
    if fmt != FORMAT:
        raise wrong("format", fmt, f'"{FORMAT}" (not an AHIQ export?)')
    if not (isinstance(version, int) and not isinstance(version, bool)):
        raise wrong("version", version, f"the whole number {VERSION}")
    if version != VERSION:
        raise ExportFolderError(f"{path} is {FORMAT} version {version}; this ahiq reads version {VERSION}: export again "
                                f"with this version (python -m ahiq export)")
    whole(field(settings, "crop_size"), "crop_size", 1)
    crops = field(settings, "crops")
    if field(crops, "mode") not in EVAL_CROPS:
        raise wrong("crops.mode", field(crops, "mode"), f"one of {', '.join(EVAL_CROPS)}")
    whole(field(crops, "count"), "crops.count", 1)
    whole(field(crops, "seed"), "crops.seed", 0)
    files = field(settings, "files")
    if not isinstance(files, dict) or not files:
        raise wrong("files", files, "an object naming each graph file")
    for name, entry in files.items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise wrong("files", name, "plain file names in the export folder")
        whole(field(entry, "size"), f"files.{name}.size", 0)
        digest = field(entry, "sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise wrong(f"files.{name}.sha256", digest, "a SHA-256 in 64 hexadecimal digits")
    models = field(settings, "models")
    if not isinstance(models, list) or not models:
        raise wrong("models", models, "a list of one or more models")
    for i, model in enumerate(models):
        config = field(model, "config")
        if field(config, "fusion") not in FUSIONS:
            raise wrong(f"models[{i}].config.fusion", field(config, "fusion"), f"one of {', '.join(FUSIONS)}")
        for key in ("img_size", "vit_dim", "cnn_width"):
            whole(field(config, key), f"models[{i}].config.{key}", 1)
        if config["img_size"] != settings["crop_size"]:
            raise wrong(f"models[{i}].config.img_size", config["img_size"], f"the crop_size, {settings['crop_size']}")
        for role in ("reference", "score"):
            file = field(field(model, role), "file")
            if not isinstance(file, str) or file not in files:
                raise wrong(f"models[{i}].{role}.file", file, "one of the files listed under 'files'")


class _Missing:
    """A field the settings lack."""


class OnnxScorer:
    """An export folder's models (one, or an ensemble) on onnxruntime: ``score_pairs`` and ``score`` as
    ahiq.Scorer's. ``crops``, ``num_crops``, ``seed``: the crop ensemble (default: the export's);
    ``crop_chunk``: the most crops in one run of a graph (default: ahiq.runtime.memory's rule, as the
    PyTorch scorer's on a CPU); ``threads``: onnxruntime's intra-op threads (default: the CPUs this process
    may use, as the command lines choose them)."""

    def __init__(self, folder: PathLike, crops: str | None = None, num_crops: int | None = None,
                 seed: int | None = None, batch_size: int = 1, crop_chunk: int | None = None,
                 threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise ImportError("scoring with an ONNX export needs onnxruntime: pip install 'onnxruntime>=1.25'") from None
        self.folder = Path(folder)
        self.export = read_settings(self.folder)
        found = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2] if part.isdigit())
        if found < DEFORM_CONV_ONNXRUNTIME and any(m["config"]["fusion"] == "deform+concat" for m in self.export["models"]):
            raise ImportError(f"{self.folder}'s deformable convolution (ONNX DeformConv) needs onnxruntime "
                              f"{'.'.join(map(str, DEFORM_CONV_ONNXRUNTIME))} or later; this is onnxruntime "
                              f"{onnxruntime.__version__}: pip install -U onnxruntime")
        default = self.export["crops"]
        self.plan = CropPlan(self.export["crop_size"], crops or default["mode"],
                             num_crops if num_crops is not None else default["count"],
                             seed if seed is not None else default["seed"])
        self.batch_size = batch_size
        self.threads, self.threads_why = choose_threads(threads)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads  # onnxruntime's own default ignores affinity and quotas
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = []
        for model in self.export["models"]:
            pair = {}
            for role in ("reference", "score"):
                path = self.folder / model[role]["file"]
                try:
                    pair[role] = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                except Exception as exc:
                    raise ExportFolderError(f"onnxruntime cannot load {path} ({str(exc).splitlines()[0][:200]}); "
                                            f"export again") from None
            self.sessions.append(pair)
        self.chunk = crop_chunk or min(cpu_crops(crop_cost(m["config"]).evaluating, "fp32")
                                       for m in self.export["models"])

    def describe(self) -> str:
        return (f"onnxruntime, {self.folder} ({len(self.sessions)} model(s)), fp32; CPU threads: {self.threads} "
                f"({self.threads_why})")

    def settings(self) -> dict:
        """What decides the scores, for resuming a journaled run only with the same (ahiq.scoring.journal)."""
        graphs = [f"{name} sha256 {entry['sha256']}" for name, entry in self.export["files"].items()]
        return {"onnx": graphs, "crops": self.plan.settings(), "precision": "fp32 onnxruntime"}

    def check_maps(self) -> None:
        raise ExportFolderError("--maps needs the PyTorch scorer: the ONNX export holds the scores' graphs, not "
                                "the maps'; leave out --onnx to draw maps")

    def score(self, dist: PathLike, ref: PathLike) -> float:
        return float(self.score_pairs(pair_files(dist, ref))[0])

    def check(self, pairs: Pairs) -> None:
        check_images(pairs, self.plan.size, whole=self.plan.mode == "whole")

    def score_pairs(self, pairs: Pairs, progress: bool | str = False,
                    on_reference: Callable[[list[int], np.ndarray], None] | None = None, on_maps=None) -> np.ndarray:
        """Scores of ``pairs`` in their order, grouped by reference as ahiq.scoring.inference.predict groups
        them; ``on_reference(indices, scores)`` as each reference is done."""
        self.check(pairs)  # every pair before the first score
        out = np.empty(len(pairs))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(pairs), desc=progress if isinstance(progress, str) else "score", unit="pair",
                       dynamic_ncols=True, disable=None)
        for group in reference_groups(pairs):
            ref = read_image(pairs[group[0]].ref)
            windows = self.plan.windows(*ref.shape[:2], Path(pairs[group[0]].ref).name)
            ref_crops = _crops(self.plan, ref, windows)
            features = [self._reference_features(sessions, ref_crops) for sessions in self.sessions]
            for a in range(0, len(group), self.batch_size):
                batch = group[a:a + self.batch_size]
                dists = np.stack([_crops(self.plan, read_image(pairs[i].dist), windows) for i in batch])  # [P, K, ...]
                per_model = [self._scores(sessions, feats, dists) for sessions, feats in zip(self.sessions, features)]
                out[batch] = np.mean(per_model, axis=0)
                if bar is not None:
                    bar.update(len(batch))
            if on_reference is not None:
                on_reference(list(group), out[group])
        if bar is not None:
            bar.close()
        return out

    def _reference_features(self, sessions: dict, ref_crops: np.ndarray) -> dict[str, np.ndarray]:
        """The reference graph's outputs by name (``reduced``, and ``offset`` where the model has them)."""
        names = [output.name for output in sessions["reference"].get_outputs()]
        runs = [sessions["reference"].run(names, {"ref": ref_crops[a:a + self.chunk]})
                for a in range(0, len(ref_crops), self.chunk)]
        return {name: np.concatenate(parts) for name, parts in zip(names, zip(*runs))}

    def _scores(self, sessions: dict, features: dict[str, np.ndarray], dists: np.ndarray) -> np.ndarray:
        """[P] mean scores over the K crops of P distorted images [P, K, 3, S, S], crop k against reference
        crop k."""
        p, k = dists.shape[:2]
        flat = dists.reshape(p * k, *dists.shape[2:])
        scores = np.empty(p * k, np.float32)
        for a in range(0, p * k, self.chunk):
            rows = np.arange(a, min(a + self.chunk, p * k)) % k  # the reference crop of each distorted crop
            feed = {"dist": flat[a:a + self.chunk], **{name: f[rows] for name, f in features.items()}}
            scores[a:a + self.chunk] = sessions["score"].run(None, feed)[0]
        return scores.reshape(p, k).astype(np.float64).mean(1)

    def score_crops(self, sessions: dict, dist: np.ndarray, ref: np.ndarray) -> np.ndarray:
        """Scores [N] of distorted crops [N, 3, S, S] against reference crops [N, 3, S, S], one model's graphs."""
        return sessions["score"].run(None, {"dist": dist, **self._reference_features(sessions, ref)})[0]


def _crops(plan: CropPlan, image: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """An 8-bit RGB image's crops at ``windows`` as the graphs take them: float32 [K, 3, S, S] in [0, 1], the
    values ahiq.data.datasets.to_tensor gives."""
    crops = np.stack(plan.cut(image, windows)).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(crops, dtype=np.float32) / np.float32(255.0)



