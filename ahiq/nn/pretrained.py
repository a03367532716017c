"""How a model gets its weights: which backbone files a model of some options needs (found by the rule of
ahiq.nn.zoo, all in one search, so that one error names every missing file), and loading a trained model from
a released name, a checkpoint file or a weights folder (``AHIQ.from_pretrained``), refusing random backbones
unless asked. The network class is passed in (``cls``): this module does not import it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ahiq.nn.backbones import cnn_overrides, vit_overrides
from ahiq.nn.checkpoints import AHIQ_VARIANT, ARCHITECTURE_KEYS, is_project_checkpoint, saved_config
from ahiq.nn.downloads import locate
from ahiq.nn.weights import WeightsError, read_weight_file
from ahiq.nn.zoo import BACKBONES, RELEASED, find, released
from ahiq.options import DEFAULTS
from ahiq.registry.variants import CNNS, FUSIONS, VITS


def backbone_options(opt: dict) -> list[tuple[str, str, str]]:
    """(option, what, state-dict prefix) of each backbone the model of the options ``opt`` builds."""
    fusion = FUSIONS[opt["fusion"]]
    return ([("vit_pretrained", "ViT", "vit.")] if fusion.vit else []) + \
        ([("cnn_pretrained", CNNS[opt["cnn"]].label, "cnn.")] if fusion.cnn else [])


def _holds(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def backbone_files(opt: dict, held=()) -> dict:
    """{option: released backbone file} for the pretrained options that are ``True`` of the backbones the
    model builds, except those the checkpoint holds."""
    tags, reduced = {}, {}
    if FUSIONS[opt["fusion"]].vit:
        tags["vit_pretrained"] = VITS[opt["patch_size"]].tag
        reduced["vit_pretrained"] = vit_overrides(opt["img_size"], opt["vit_dim"], opt["vit_heads"])
    if FUSIONS[opt["fusion"]].cnn:
        tags["cnn_pretrained"] = CNNS[opt["cnn"]].tag
        reduced["cnn_pretrained"] = cnn_overrides(opt["cnn"], opt["cnn_width"])
    wanted = [option for option, _, prefix in backbone_options(opt) if opt[option] is True and not _holds(held, prefix)]
    for option in wanted:
        if reduced[option]:
            raise ValueError(f"model.{option} is true, but {tags[option]} with {reduced[option]} is a reduced "
                             f"configuration: it has no pretrained weights; set it to false or a weight file")
    return {option: BACKBONES[tags[option]] for option in wanted}


def _released_in(folder: Path) -> str:
    """The name of the one released model in a weights folder."""
    names = [name for name, model in RELEASED.items() if find(model.file, folder) is not None]
    if len(names) != 1:
        files = ", ".join(model.file.name for model in RELEASED.values())
        raise WeightsError(f"checkpoint folder {folder} holds {'no' if not names else len(names)} released AHIQ "
                           f"files ({files}); give a file, or a folder from python -m ahiq download --dir with "
                           f"one model")
    return names[0]


def construct(cls, opt: dict):
    """A ``cls`` (the network) of the complete ``model`` options ``opt``, its pretrained sources resolved."""
    return cls(opt["patch_size"], opt["vit_pretrained"], opt["cnn_pretrained"], freeze_backbones=opt["freeze_backbones"],
               deform_impl=opt["deform_impl"], **{k: opt[k] for k in ARCHITECTURE_KEYS})


def build(cls, model_opt: dict):
    """A new ``cls`` from the ``model`` options, for training: the pretrained backbones found (both in one
    search, so that one error names every missing file) by the rule of ahiq.nn.zoo."""
    wanted = backbone_files(model_opt)
    return construct(cls, {**model_opt, **dict(zip(wanted, locate(list(wanted.values()), model_opt["weights"])))})


def load_pretrained(cls, checkpoint: str | os.PathLike, allow_random_backbones: bool, model_options: dict) -> Any:
    """AHIQ.from_pretrained's work, for the network class ``cls``: see its documentation."""
    unknown = sorted(set(model_options) - set(DEFAULTS["model"]))
    if unknown:
        raise TypeError(f"AHIQ.from_pretrained got unknown model options {', '.join(unknown)}; known: "
                        f"{', '.join(DEFAULTS['model'])}")
    opt = {**DEFAULTS["model"], **model_options}
    weights, name = opt["weights"], None
    if isinstance(checkpoint, (str, os.PathLike)) and Path(checkpoint).is_dir():
        weights, name = checkpoint, _released_in(Path(checkpoint))
    elif released(checkpoint) is not None:
        name = checkpoint
    if name is not None:  # a released model: its own architecture; the file and the backbones found together
        opt.update(AHIQ_VARIANT, patch_size=RELEASED[name].patch_size)
        wanted = backbone_files(opt)
        path, *backbones = locate([RELEASED[name].file, *wanted.values()], weights)
        saved = read_weight_file(path)
    else:
        path = Path(checkpoint)
        saved = read_weight_file(path)  # read once: a checkpoint with fine-tuned backbones is large
    project = is_project_checkpoint(saved, path)
    held = saved["model"].keys() if project else ()  # official files hold no backbones
    # the architecture it was saved for (official files: AHIQ's)
    opt.update({k: v for k, v in saved_config(saved, project).items() if k in opt})
    if name is None:
        wanted = backbone_files(opt, held)
        backbones = locate(list(wanted.values()), weights)
    opt.update(zip(wanted, backbones))
    opt.update({option: False for option, _, prefix in backbone_options(opt) if _holds(held, prefix)})
    model = construct(cls, opt)
    model.restore(saved, path)  # a checkpoint that does not fit is the first thing to report
    model.source = path  # the file the model came from, and where its backbones' weights came from
    model.backbone_sources = tuple("checkpoint" if _holds(held, prefix) else str(opt[option])
                                   for option, _, prefix in backbone_options(opt))
    random = [(option, what) for option, what, prefix in backbone_options(opt)
              if opt[option] is False and not _holds(held, prefix)]
    if random and not allow_random_backbones:
        options = " and ".join(f"model.{o} (--{o.replace('_', '-')})" for o, _ in random)
        raise WeightsError(f"checkpoint {path} holds no {' or '.join(w for _, w in random)} weights and "
                           f"{options} {'are' if len(random) > 1 else 'is'} false: the scores would come from "
                           f"random backbone weights; set it to true (the released weights) or a weight file, "
                           f"or allow it with allow_random_backbones (test.allow_random_backbones=true, "
                           f"--allow-random-backbones)")
    return model
