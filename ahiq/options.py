"""Experiment options: YAML files (``base:`` names a file to extend), ``key.path=value`` overrides from the
command line, and a schema that rejects unknown keys (suggesting the nearest) and wrong types.

DEFAULTS below is the schema: every option, its default and (in the README) its meaning.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
from pathlib import Path
from typing import Any

import yaml

SOURCE = {"dataset": None, "root": None, "options": {}}  # one labelled or unlabelled set of pairs

DEFAULTS: dict[str, Any] = {
    "name": None,
    "model": {
        "patch_size": 8, "vit_pretrained": True, "cnn_pretrained": True, "weights": None, "freeze_backbones": True,
        "deform_impl": "bilinear", "img_size": 224, "vit_dim": 768, "vit_heads": 12, "cnn_width": 64,
        "fusion_hidden": 512, "head_dim": 256, "head_hidden": 1024,
    },
    "data": {
        **SOURCE,
        "split": {"ratios": [0.6, 0.2, 0.2], "seed": 0, "file": None},
        "val": None, "test": None,
        "flip": "width", "random_crop": "all", "targets": "dataset", "num_workers": 2,
    },
    "train": {
        "epochs": 200, "batch_size": 4, "lr": 1e-4, "weight_decay": 1e-5, "t_max": 50, "eta_min": 0.0,
        "seed": 1919, "val_crops": "five", "val_every": 1, "save_interval": 5, "resume": None,
        "device": "auto", "log_every": 20, "nonfinite_loss": "stop", "drop_last": False, "best": "main",
    },
    "runtime": {"precision": "fp32", "tf32": False, "channels_last": False, "compile": False, "crop_chunk": None,
                "threads": None},
    "test": {
        "checkpoint": "best", "crops": "random", "num_crops": 20, "seed": 0, "batch_size": 2, "output": None,
        "allow_random_backbones": False, "maps": 0,
        "submission": {"runtime": None, "gpu": None, "extra_data": False,
                       "description": "AHIQ (Lao, Gong et al., CVPRW 2022), ahiq reference implementation."},
    },
}

# Options whose type is not that of their default; "source" is a SOURCE dict or null.
TYPES: dict[str, tuple] = {
    "name": (str,), "model.vit_pretrained": (bool, str), "model.cnn_pretrained": (bool, str),
    "model.weights": (str, type(None)),
    "data.dataset": (str,), "data.root": (str,), "data.options": (dict,), "data.split.file": (str, type(None)),
    "data.val": ("source",), "data.test": ("source",), "data.flip": (str, type(None)),
    "train.resume": (str, type(None)), "test.checkpoint": (str, list), "test.output": (str, type(None)),
    "test.submission.runtime": (float, type(None)), "test.submission.gpu": (bool, type(None)),
    "runtime.compile": (bool, str), "runtime.crop_chunk": (int, type(None)),
    "runtime.threads": (int, type(None)),
}
CHOICES = {
    "model.patch_size": (8, 16), "model.deform_impl": ("bilinear", "torchvision"),
    "data.flip": ("width", "height", None), "train.val_crops": ("five", "nine", "random", "centre", "whole"),
    "test.crops": ("five", "nine", "random", "centre", "whole"), "train.nonfinite_loss": ("stop", "skip"),
    "runtime.precision": ("fp32", "bf16", "auto"), "data.random_crop": ("all", "official"), "data.targets": ("dataset", "part"),
    "train.best": ("main", "official"),
}

# The domain of every numeric option: (lowest value, whether the lowest itself is allowed). Every number must
# also be finite. Where 0 is allowed it means: data.num_workers 0 loads in the main process;
# train.weight_decay 0 and train.eta_min 0 are none; data.split.seed, train.seed, test.seed 0 are seeds.
RANGES: dict[str, tuple[float, bool]] = {
    "model.img_size": (16, True), "model.vit_dim": (1, True), "model.vit_heads": (1, True),
    "model.cnn_width": (1, True), "model.fusion_hidden": (1, True), "model.head_dim": (1, True),
    "model.head_hidden": (1, True), "data.split.seed": (0, True), "data.num_workers": (0, True),
    "train.epochs": (1, True), "train.batch_size": (1, True), "train.lr": (0, False), "train.weight_decay": (0, True),
    "train.t_max": (1, True), "train.eta_min": (0, True), "train.seed": (0, True), "train.val_every": (1, True),
    "train.save_interval": (1, True), "train.log_every": (1, True), "runtime.crop_chunk": (1, True), "runtime.threads": (1, True),
    "test.num_crops": (1, True), "test.maps": (0, True), "test.seed": (0, True), "test.batch_size": (1, True),
    "test.submission.runtime": (0, True),
}


class OptionsError(ValueError):
    """An option file or override that cannot be used: the message names the file and key."""


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict) and value and (prefix + key) not in TYPES:
            keys.extend(_flat_keys(value, prefix + key + "."))
    return keys


ALL_KEYS = _flat_keys(DEFAULTS) + [f"data.{s}.{k}" for s in ("val", "test") for k in SOURCE]


def _unknown(key: str, where: str) -> OptionsError:
    near = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return OptionsError(f"{where}: unknown option '{key}'{hint}")


def _coerce_number(key: str, value: Any, default: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string: accept such numbers where a float is expected."""
    if isinstance(value, str) and (isinstance(default, float) or float in TYPES.get(key, ())):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_type(key: str, value: Any, default: Any, where: str) -> None:
    allowed = TYPES.get(key)
    if allowed is None:
        allowed = (float, int) if isinstance(default, float) else (type(default),)
    elif float in allowed:
        allowed = (*allowed, int)
    if "source" in allowed:
        if value is None:
            return
        if not isinstance(value, dict):
            raise OptionsError(f"{where}: option '{key}' must be a mapping with {', '.join(SOURCE)} or null, got {value!r}")
        for sub in value:
            if sub not in SOURCE:
                raise _unknown(f"{key}.{sub}", where)
        return
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise OptionsError(f"{where}: option '{key}' must be {names}, got {value!r} ({type(value).__name__})")
    if key in CHOICES and value not in CHOICES[key]:
        raise OptionsError(f"{where}: option '{key}' must be one of {', '.join(map(str, CHOICES[key]))}, got {value!r}")
    if key in RANGES and value is not None:
        low, inclusive = RANGES[key]
        if not math.isfinite(value):
            raise OptionsError(f"{where}: option '{key}' must be a finite number, got {value!r}")
        if value < low or (value == low and not inclusive):
            bound = f"at least {low}" if inclusive else f"greater than {low}"
            raise OptionsError(f"{where}: option '{key}' must be {bound}, got {value!r}")
    if key == "name" and value is not None and not _plain_folder_name(value):
        raise OptionsError(f"{where}: option 'name' must be a plain folder name (it becomes checkpoints/<name>/: "
                           f"no '/' or '\\', not '.' or '..', no surrounding spaces), got {value!r}")


def _plain_folder_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and name.strip() == name


def _check_relations(options: dict, where: str) -> None:
    """What no single option can check: sizes that must divide, and the split's shares."""
    model = options["model"]
    if model["img_size"] % model["patch_size"]:
        raise OptionsError(f"{where}: model.img_size {model['img_size']} must be a multiple of model.patch_size "
                           f"{model['patch_size']}")
    if model["vit_dim"] % model["vit_heads"]:
        raise OptionsError(f"{where}: model.vit_dim {model['vit_dim']} must be a multiple of model.vit_heads "
                           f"{model['vit_heads']}")
    ratios = options["data"]["split"]["ratios"]
    if (not isinstance(ratios, list) or len(ratios) not in (2, 3)
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0
                       for r in ratios) or sum(ratios) <= 0):
        raise OptionsError(f"{where}: data.split.ratios must be 2 (train, test) or 3 (train, val, test) non-negative "
                           f"numbers with a positive sum, got {ratios!r}")


def _merge(base: dict, update: dict, schema: dict, where: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        full = prefix + key
        if key not in schema:
            raise _unknown(full, where)
        default = schema[key]
        if isinstance(default, dict) and full not in TYPES and isinstance(value, dict):
            out[key] = _merge(out.get(key) or {}, value, default, where, full + ".")
        elif isinstance(default, dict) and full not in TYPES:
            raise OptionsError(f"{where}: option '{full}' is a group ({', '.join(default)}), got {value!r}")
        else:
            value = _coerce_number(full, value, default)
            _check_type(full, value, default, where)
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> tuple[dict, list[Path]]:
    """The file's options with its ``base`` chain applied underneath; also the chain of files read."""
    if not path.is_file():
        raise OptionsError(f"option file {path} does not exist")
    if path.resolve() in seen:
        raise OptionsError(f"option file {path} extends itself through 'base'")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise OptionsError(f"option file {path} is not valid YAML: {exc}") from None
    if not isinstance(content, dict):
        raise OptionsError(f"option file {path} must hold a mapping of options")
    base = content.pop("base", None)
    if base is None:
        return [(path, content)], [path]
    parents, files = _read_yaml((path.parent / base), seen + (path.resolve(),))
    return parents + [(path, content)], files + [path]


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise OptionsError(f"command-line override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_options(path: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """Defaults, then the option file (and its bases), then the overrides; validated."""
    options = copy.deepcopy(DEFAULTS)
    if path is not None:
        layers, _ = _read_yaml(Path(path))
        for file, content in layers:
            options = _merge(options, content, DEFAULTS, str(file))
    for text in overrides:
        key, value = parse_override(text)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        options = _merge(options, nested, DEFAULTS, f"override '{text}'")
    if not options["name"]:
        raise OptionsError(f"{path or 'options'}: option 'name' (the experiment folder checkpoints/<name>/) is not set")
    _check_relations(options, f"{path or 'options'}{' with the command-line overrides' if overrides else ''}")
    return options


def save_options(options: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(options, sort_keys=False))
