"""Experiment options: one declaration per option (default, type, domain, meaning), YAML files (``base:``
names a file to extend), ``key.path=value`` overrides from the command line, and checks that reject unknown
keys (suggesting the nearest), wrong types and values out of their domain before anything runs.

OPTIONS is the schema. DEFAULTS, the checks, ``python train.py --help`` and the options table of
docs/training.md (``markdown_table``) are all made from it.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ahiq.registry import Registry
from ahiq.registry.baselines import BASELINES
from ahiq.registry.datasets import DATASETS, dataset
from ahiq.registry.released import RELEASED
from ahiq.registry.settings import BOOTSTRAP_UNITS, DEFORM_IMPLS, EVAL_CROPS, FLIPS, PRECISIONS, RANDOM_CROPS
from ahiq.registry.variants import CNNS, FULL_WIDTH, FUSIONS, POOLINGS, VITS

SOURCE = ("dataset", "root", "options")  # the keys of one labelled or unlabelled set of pairs (data.val, data.test)
NULL = type(None)


@dataclass(frozen=True)
class Option:
    key: str
    default: Any
    meaning: str                    # one line, Markdown (docs/training.md's table; plain text in --help)
    types: tuple = ()               # allowed types when not just the default's; "source": a data set or null
    choices: tuple = ()             # the allowed values; of each element for a list
    at_least: float | None = None   # numbers: the lowest value (every number must also be finite)
    above: bool = False             # ... and the lowest itself not allowed
    at_most: float | None = None    # numbers: the highest value
    shown: str | None = None        # the default as the table shows it, when not the value itself

    def allowed(self) -> tuple:
        if not self.types:
            return (float, int) if isinstance(self.default, float) else (type(self.default),)
        return (*self.types, int) if float in self.types else self.types


def _chosen(key: str, kind: Registry, before: str = "", after: str = "", named: bool = False, **details) -> Option:
    """An option whose values are the choices of ``kind`` (ahiq.registry), its first the default, each described
    (``named``: only named)."""
    choices = kind.listed() if named else kind.described()
    return Option(key, kind.default.name, before + choices + after, choices=kind.names, **details)


def _pretrained(part: str) -> str:
    return (f"the {part}'s weights: true: the released backbone weights, found as [weights.md](weights.md) says; "
            f"false: random; a path: a local weight file")


def _size(what: str) -> str:
    return f"{what}; change the sizes only for small experiments such as the demo"


OPTIONS = [
    Option("name", None, "experiment name: the folder `checkpoints/<name>/`", (str,), shown="(required)"),
    _chosen("model.patch_size", VITS, "the ViT: "),
    _chosen("model.fusion", FUSIONS, "the paper's Table 6: ",
            "; see [reproducing.md](reproducing.md#tables-6-8-ablations-pipal-ntire-2022-test-set)"),
    _chosen("model.cnn", CNNS, "the CNN branch (Table 7), read at its stride-4 stage: ",
            "; not read by `model.fusion: vit`", named=True),
    _chosen("model.pooling", POOLINGS, "the paper's Table 8: "),
    Option("model.vit_pretrained", True, _pretrained("ViT"), (bool, str)),
    Option("model.cnn_pretrained", True, _pretrained("CNN"), (bool, str)),
    Option("model.weights", None, "a weights folder (`python -m ahiq download --dir`): every weight file from there "
           "and no download; null: `$AHIQ_WEIGHTS`, else torch's hub cache ([weights.md](weights.md)); also "
           "`--weights DIR`", (str, NULL)),
    Option("model.freeze_backbones", True, "false fine-tunes the backbones too"),
    _chosen("model.deform_impl", DEFORM_IMPLS, "the deformable convolution: "),
    Option("model.img_size", 224, _size("the input crop size, a multiple of the patch size"), at_least=16),
    Option("model.vit_dim", 768, _size("the ViT's width, a multiple of its heads"), at_least=1),
    Option("model.vit_heads", 12, _size("the ViT's attention heads"), at_least=1),
    Option("model.cnn_width", FULL_WIDTH, _size("the CNN's base width (a ResNet's stride-4 stage gives 12 times as many "
                                        "channels, HRNet's 16; timm's InceptionResNetV2 has no width)"),
           at_least=1),
    Option("model.fusion_hidden", 512, _size("the fusion's hidden channels"), at_least=1),
    Option("model.head_dim", 256, _size("the head's channels per image after its 1x1 reduction"), at_least=1),
    Option("model.head_hidden", 1024, _size("the head's hidden channels"), at_least=1),
    Option("data.dataset", None, DATASETS.described() + " (written in any case, with or without `-`)", (str,),
           shown="(required)"),
    Option("data.root", None, "the folder the dataset was unpacked in", (str,), shown="(required)"),
    Option("data.options", {}, "the reader's keyword arguments (label file, folders, direction; see "
           "[datasets.md](datasets.md))", (dict,)),
    Option("data.split.ratios", [0.6, 0.2, 0.2], "train/val/test shares of the *references* (two numbers: "
           "train/test, validation on the test part)"),
    Option("data.split.seed", 0, "split n of K is seed n", at_least=0),
    Option("data.split.file", None, "read the split from a file written by `save_split` (every run writes its own "
           "`split.json`)", (str, NULL)),
    Option("data.val", None, "a separate labelled set for validation `{dataset, root, options}` (PIPAL: NTIRE 2021 "
           "validation); then all of `data` trains", ("source",)),
    Option("data.test", None, "a separate set for test.py `{dataset, root, options}`; unlabelled gives an NTIRE "
           "submission", ("source",)),
    _chosen("data.flip", FLIPS, "the training pairs' random flip: ", types=(str, NULL)),
    _chosen("data.random_crop", RANDOM_CROPS),
    Option("data.targets", "dataset", "targets normalised over the whole labelled source before splitting; `part`: "
           "each part (train, val, test) over its own pairs, as the official code normalises each of its list files",
           choices=("dataset", "part")),
    Option("data.num_workers", 2, "DataLoader worker processes (0: load in the main process)", at_least=0),
    Option("train.epochs", 200, "epochs", at_least=1),
    Option("train.batch_size", 4, "pairs per step (and pairs per validation batch); under torchrun the global "
           "batch", at_least=1),
    Option("train.lr", 1e-4, "Adam's learning rate", at_least=0, above=True),
    Option("train.weight_decay", 1e-5, "Adam's weight decay (0: none)", at_least=0),
    Option("train.t_max", 50, "CosineAnnealingLR's T_max, stepped every iteration", at_least=1),
    Option("train.eta_min", 0.0, "CosineAnnealingLR's eta_min", at_least=0),
    Option("train.seed", 1919, "seeds the initialisation, the epoch order and the crops", at_least=0),
    Option("train.val_crops", "five", "validation crops (see [datasets.md](datasets.md#evaluation-crops))",
           choices=EVAL_CROPS.names),
    Option("train.val_every", 1, "validate every N epochs (and after the last)", at_least=1),
    Option("train.save_interval", 5, "write `epoch_<N>.pth` every N epochs", at_least=1),
    Option("train.resume", None, "null: a new run; `auto`: continue from `latest.pth` if there is one; a path",
           (str, NULL)),
    Option("train.device", "auto", "`auto` (CUDA if available), `cpu`, `cuda`, `cuda:1` ...; also `--device D`"),
    Option("train.log_every", 20, "TensorBoard loss/learning-rate interval in steps", at_least=1),
    Option("train.nonfinite_loss", "stop", "a NaN/inf loss: `stop` the run, or `skip` the batch (logged); the "
           "weights are never updated by such a batch", choices=("stop", "skip")),
    Option("train.drop_last", False, "`true`: leave out the last incomplete batch of every epoch (the official "
           "loader's `drop_last=True`)"),
    Option("train.best", "main", "`best.pth` when the validation main score (abs(PLCC) + abs(SROCC)) improves; "
           "`official`: when SROCC or PLCC alone improves, as the official train.py", choices=("main", "official")),
    _chosen("runtime.precision", PRECISIONS, "", ". See [performance.md](performance.md#runtime-settings) for when to "
            "choose what"),
    Option("runtime.tf32", False, "let fp32 matmuls and convolutions use TF32 on GPUs that have it (false: strict "
           "fp32, the reference numbers)"),
    Option("runtime.channels_last", True, "NHWC weights and inputs for the convolutions (what tensor cores want, and "
           "faster on the CPUs measured: [performance.md](performance.md#runtime-settings)); false: NCHW"),
    Option("runtime.compile", False, "`true`: `torch.compile` the model (inductor); or a backend name. Compiling "
           "takes minutes; it pays off on long runs", (bool, str)),
    Option("runtime.crop_chunk", None, "the most crops in one forward pass when evaluating; null: on a CPU as many as a "
           "quarter of its available memory holds, at most those that pay off there (fp32 1, bf16 4); on a GPU as "
           "many as half its free memory holds, at most 64 (a full-size crop counts 128 MiB); set a number when out "
           "of memory", (int, NULL), at_least=1),
    Option("runtime.threads", None, "CPU threads of the command lines' runs (train.py, test.py); null: "
           "`OMP_NUM_THREADS` when set, else the CPUs this process may use (affinity, cgroup quota, Slurm's "
           "allocation), shared among torchrun's processes on the node. The demo sets 1 "
           "([performance.md](performance.md#several-jobs-on-one-machine))", (int, NULL), at_least=1),
    Option("test.checkpoint", "best", f"`best`, `latest`, a path, a released model's name (`{RELEASED.default.name}`, "
           f"see [scoring.md](scoring.md#released-models)), or a list of them (an ensemble)", (str, list)),
    Option("test.crops", "random", "evaluation crops: " + EVAL_CROPS.described() + " (see "
           "[datasets.md](datasets.md#evaluation-crops))", choices=EVAL_CROPS.names),
    Option("test.num_crops", 20, "random crops per pair (`test.crops=random`)", at_least=1),
    Option("test.seed", 0, "seeds the random crops, with the reference image's name", at_least=0),
    Option("test.batch_size", 2, "pairs per batch (each with all its crops)", at_least=1),
    Option("test.output", None, "output folder; null: `checkpoints/<name>/test/`", (str, NULL)),
    Option("test.allow_random_backbones", False, "test.py refuses a checkpoint that holds only the head when the "
           "backbones would be random (`vit_pretrained`/`cnn_pretrained: false`); `true` tests it anyway (the "
           "scores mean nothing)"),
    Option("test.maps", 0, "N > 0: quality-map panels and arrays of the N pairs predicted worst and the N best in "
           "`test/maps/` (see [scoring.md](scoring.md#quality-maps))", at_least=0),
    Option("test.baselines", [], "baseline metrics scored on the same test part, each into `test/baselines/<metric>/` "
           "(results, metrics, tables, figures) for `python -m ahiq compare`: any of `" + "`, `".join(BASELINES) +
           "` (the optional extra `pip install -e '.[baselines]'`; see [evaluation.md](evaluation.md#baselines))",
           (list,), choices=BASELINES.names),
    Option("test.bootstrap.resamples", 1000, "bootstrap resamples of the 95% intervals of SROCC and PLCC (0: none; "
           "at most 100000, far past where the intervals settle); see [evaluation.md](evaluation.md)", at_least=0,
           at_most=100_000),
    _chosen("test.bootstrap.by", BOOTSTRAP_UNITS, "what the bootstrap resamples: "),
    Option("test.bootstrap.seed", 0, "seeds the bootstrap: a rerun gives the same intervals", at_least=0),
    Option("test.submission.runtime", None, "seconds per image for readme.txt; null: measured", (float, NULL),
           at_least=0),
    Option("test.submission.gpu", None, "readme.txt's CPU/GPU line; null: from the device used", (bool, NULL)),
    Option("test.submission.extra_data", False, "readme.txt's extra-data line"),
    Option("test.submission.description", "AHIQ (Lao, Gong et al., CVPRW 2022), ahiq reference implementation.",
           "readme.txt's description"),
]
SCHEMA = {option.key: option for option in OPTIONS}


def _nested(options: list[Option]) -> dict:
    tree: dict = {}
    for option in options:
        *groups, leaf = option.key.split(".")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = copy.deepcopy(option.default)
    return tree


DEFAULTS: dict[str, Any] = _nested(OPTIONS)
GROUPS = sorted({key.rsplit(".", i)[0] for key in SCHEMA for i in range(1, key.count(".") + 1)})
ALL_KEYS = [*SCHEMA, *GROUPS, *(f"data.{s}.{k}" for s in ("val", "test") for k in SOURCE)]


def _yaml(value: Any) -> str:
    if isinstance(value, float) and value and abs(value) < 1e-3:
        return f"{value:.0e}".replace("e-0", "e-")  # 1e-4, as the option files write it
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def markdown_table() -> str:
    """docs/training.md's options table: one row per option."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for o in OPTIONS:
        rows.append(f"| `{o.key}` | {o.shown or _yaml(o.default)} | {o.meaning} |")
    return "\n".join(rows) + "\n"


LINK = re.compile(r"\[([^\]]+)\]\(([^)#]+)[^)]*\)")  # a Markdown link within docs/


def plain(meaning: str) -> str:
    """An option's Markdown meaning as plain text (--help): links as their page's path, no backquotes."""
    return LINK.sub(lambda m: f"docs/{m[2]}" if m[1] == m[2] else f"{m[1]} (docs/{m[2]})", meaning).replace("`", "")


def plain_text(width: int = 100) -> str:
    """Every option, its default and its meaning as text (train.py's and test.py's --help)."""
    lines = []
    for o in OPTIONS:
        lines.append(f"  {o.key} = {o.shown or _yaml(o.default)}")
        lines += textwrap.wrap(plain(o.meaning), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


class OptionsError(ValueError):
    """An option file or override that cannot be used: the message names the file and key."""


def _unknown(key: str, where: str) -> OptionsError:
    near = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return OptionsError(f"{where}: unknown option '{key}'{hint}")


def _coerce_number(option: Option, value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string: accept such numbers where a float is expected."""
    if isinstance(value, str) and float in option.allowed():
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_value(option: Option, value: Any, where: str) -> None:
    key, allowed = option.key, option.allowed()
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
        names = " or ".join("null" if t is NULL else t.__name__ for t in allowed)
        raise OptionsError(f"{where}: option '{key}' must be {names}, got {value!r} ({type(value).__name__})")
    if option.choices and isinstance(value, list):
        unknown = [v for v in value if v not in option.choices]
        if unknown or len(set(map(str, value))) < len(value):
            what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "a name repeated"
            raise OptionsError(f"{where}: option '{key}': {what}; known: {', '.join(map(str, option.choices))}")
    elif option.choices and value not in option.choices:
        raise OptionsError(f"{where}: option '{key}' must be one of {', '.join(map(str, option.choices))}, got "
                           f"{value!r}")
    if option.at_least is not None and value is not None:
        low = option.at_least
        if not math.isfinite(value):
            raise OptionsError(f"{where}: option '{key}' must be a finite number, got {value!r}")
        if value < low or (value == low and option.above):
            bound = f"greater than {low}" if option.above else f"at least {low}"
            raise OptionsError(f"{where}: option '{key}' must be {bound}, got {value!r}")
        if option.at_most is not None and value > option.at_most:
            raise OptionsError(f"{where}: option '{key}' must be at most {option.at_most}, got {value!r}")
    if key == "name" and value is not None and not _plain_folder_name(value):
        raise OptionsError(f"{where}: option 'name' must be a plain folder name (it becomes checkpoints/<name>/: "
                           f"no '/' or '\\', not '.' or '..', no surrounding spaces), got {value!r}")


def check_option(key: str, value: Any, where: str) -> None:
    """One option's value against its declaration (type, choices, range) as the option files are checked, for the
    Python API's settings (ahiq.runtime.Runtime): an OptionsError naming ``where``."""
    option = SCHEMA[key]
    _check_value(option, _coerce_number(option, value), where)


def _plain_folder_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and name.strip() == name


def _check_relations(options: dict, where: str) -> None:
    """What no single option can check: the datasets named, a CNN branch the fusion has, what the CNN takes, sizes
    that must divide, and the split's shares."""
    data = options["data"]
    for source, label in ((data, "data.dataset"), (data["val"], "data.val.dataset"), (data["test"], "data.test.dataset")):
        if isinstance(source, dict) and source.get("dataset") is not None:
            try:
                dataset(source["dataset"], f"option '{label}'")
            except ValueError as exc:
                raise OptionsError(f"{where}: {exc}") from None
    model = options["model"]
    if FUSIONS[model["fusion"]].cnn:
        try:
            CNNS[model["cnn"]].check(model["img_size"], model["patch_size"], model["cnn_width"])
        except ValueError as exc:
            raise OptionsError(f"{where}: {exc}") from None
    elif model["cnn"] != CNNS.default.name:
        with_cnn = [name for name, fusion in FUSIONS.items() if fusion.cnn]
        raise OptionsError(f"{where}: model.cnn {model['cnn']} names a CNN branch, but model.fusion {model['fusion']} "
                           f"has none; leave model.cnn out, or choose model.fusion {', '.join(with_cnn)}")
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


def _merge(base: dict, update: dict, where: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        full = prefix + key
        option = SCHEMA.get(full)
        if option is None and full not in GROUPS:
            raise _unknown(full, where)
        if option is None and isinstance(value, dict):
            out[key] = _merge(out.get(key) or {}, value, where, full + ".")
        elif option is None:
            members = dict.fromkeys(k[len(full) + 1:].split(".")[0] for k in SCHEMA if k.startswith(full + "."))
            raise OptionsError(f"{where}: option '{full}' is a group ({', '.join(members)}), got {value!r}")
        else:
            value = _coerce_number(option, value)
            _check_value(option, value, where)
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
            options = _merge(options, content, str(file))
    for text in overrides:
        key, value = parse_override(text)
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        options = _merge(options, nested, f"override '{text}'")
    if not options["name"]:
        raise OptionsError(f"{path or 'options'}: option 'name' (the experiment folder checkpoints/<name>/) is not set")
    _check_relations(options, f"{path or 'options'}{' with the command-line overrides' if overrides else ''}")
    return options


def save_options(options: dict, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(options, sort_keys=False))
