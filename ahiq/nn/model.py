"""AHIQ: the whole network, and its checkpoints (the official released format and the project's own)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ahiq.messages import listed
from ahiq.nn.backbones import CNN_BACKBONES, CNNFeatures, Pretrained, ViTFeatures, check_cnn, vit_overrides
from ahiq.nn.downloads import locate
from ahiq.nn.fusion import FUSIONS, CNNFusion
from ahiq.nn.head import POOLINGS, Pooled, QualityHead
from ahiq.nn.weights import WeightsError, atomic_save, check_state_dict, read_weight_file
from ahiq.nn.zoo import BACKBONES, VIT_TAGS, ZOO, find, is_zoo_name

CHECKPOINT_FORMAT = "ahiq"
CHECKPOINT_VERSION = 1
# The variant of the paper's AHIQ (Tables 6, 7, 8): what the official format holds, and what a checkpoint of
# this project's written before the variants existed (its config without these keys) was trained as.
AHIQ_VARIANT = {"fusion": "deform+concat", "cnn": "resnet50", "pooling": "patch"}

# The official checkpoint's two state dicts, module by module, and where each lives here.
OFFICIAL_MODULES = {
    "deform_net_model_state_dict": {
        "conv_offset": "fusion.offset_conv",
        "deform": "fusion.deform",
        "conv1.0": "fusion.project.0",
        "conv1.2": "fusion.project.2",
    },
    "regressor_model_state_dict": {
        "down_channel": "head.reduce",
        "feat_smoothing.0": "head.smooth.0",
        "feat_smoothing.2": "head.smooth.2",
        "conv1.0": "head.hidden.0",
        "conv_attent.0": "head.attention",
        "conv.0": "head.score",
    },
}


def official_to_ahiq(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The fusion and head weights of an official AHIQ checkpoint, under this project's key names."""
    state = {}
    for section, modules in OFFICIAL_MODULES.items():
        for key, tensor in checkpoint[section].items():
            module, _, param = key.rpartition(".")
            if module not in modules:
                raise WeightsError(f"unknown key '{key}' in the official checkpoint's {section}; "
                                   f"known modules: {', '.join(modules)}")
            state[f"{modules[module]}.{param}"] = tensor
    return state


def ahiq_to_official(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of official_to_ahiq, for writing checkpoints the official code can read."""
    out = {}
    for section, modules in OFFICIAL_MODULES.items():
        out[section] = {f"{official}.{param}": state[f"{ours}.{param}"]
                        for official, ours in modules.items() for param in ("weight", "bias")}
    return out


class ReferenceFeatures(NamedTuple):
    offset: torch.Tensor | None  # [B, 18, H, W] deformable offsets on the CNN grid (None: no deformable fusion)
    reduced: torch.Tensor        # [B, head_dim, h, w] the head's 1x1 reduction of cat(ViT, fused CNN)

    def crops(self, start: int, stop: int) -> "ReferenceFeatures":
        """The features of reference crops start..stop-1."""
        return ReferenceFeatures(None if self.offset is None else self.offset[start:stop], self.reduced[start:stop])

    @staticmethod
    def joined(parts: list["ReferenceFeatures"]) -> "ReferenceFeatures":
        """Features of consecutive groups of crops, as one."""
        if len(parts) == 1:
            return parts[0]
        offset = None if parts[0].offset is None else torch.cat([p.offset for p in parts])
        return ReferenceFeatures(offset, torch.cat([p.reduced for p in parts]))


FROM_PRETRAINED = "Load it with AHIQ.from_pretrained, which builds the architecture it was saved for"


class AHIQ(nn.Module):
    """Attention-based Hybrid IQA (Lao, Gong et al., CVPRW 2022), full-reference.

    ``model(dist, ref)`` takes RGB tensors in [0, 1] of shape [B, 3, img_size, img_size] and returns [B]
    scores. The sizes after ``cnn_pretrained`` shrink the network for tests and the demo; ``fusion``
    (ahiq.nn.fusion.FUSIONS), ``cnn`` (ahiq.nn.backbones.CNN_BACKBONES) and ``pooling``
    (ahiq.nn.head.POOLINGS) choose the ablations of the paper's Tables 6, 7 and 8. The defaults are the
    paper's AHIQ; a variant builds only the parts it runs.
    """

    def __init__(
        self,
        patch_size: int = 8,
        vit_pretrained: Pretrained = True,
        cnn_pretrained: Pretrained = True,
        *,
        img_size: int = 224,
        vit_dim: int = 768,
        vit_heads: int = 12,
        cnn_width: int = 64,
        fusion_hidden: int = 512,
        head_dim: int = 256,
        head_hidden: int = 1024,
        fusion: str = AHIQ_VARIANT["fusion"],
        cnn: str | None = AHIQ_VARIANT["cnn"],
        pooling: str = AHIQ_VARIANT["pooling"],
        freeze_backbones: bool = True,
        deform_impl: str = "bilinear",
    ):
        super().__init__()
        for value, table, what in ((fusion, FUSIONS, "fusion"), (pooling, POOLINGS, "pooling")):
            if value not in table:
                raise ValueError(f"{what} must be one of {', '.join(table)}, got {value!r}")
        branches = FUSIONS[fusion]
        if branches.cnn and cnn not in CNN_BACKBONES:
            raise ValueError(f"cnn must be one of {', '.join(CNN_BACKBONES)}, got {cnn!r}")
        if branches.cnn:
            check_cnn(cnn, img_size, patch_size, cnn_width)
        # What a checkpoint must agree on; pretrained sources and implementation choices are not part of it.
        self.config = dict(patch_size=patch_size, img_size=img_size, vit_dim=vit_dim, vit_heads=vit_heads,
                           cnn_width=cnn_width, fusion_hidden=fusion_hidden, head_dim=head_dim,
                           head_hidden=head_hidden, fusion=fusion, cnn=cnn if branches.cnn else None, pooling=pooling)
        self.vit = self.cnn = self.fusion = None
        channels = 0
        if branches.vit:
            self.vit = ViTFeatures(patch_size, vit_pretrained, img_size=img_size, dim=vit_dim, heads=vit_heads)
            channels += self.vit.out_channels
        if branches.cnn:
            self.cnn = CNNFeatures(cnn, cnn_pretrained, width=cnn_width)
            # The CNN grid is img_size / 4; the fusion's two convolutions bring it down to the ViT grid.
            self.fusion = CNNFusion(self.vit.out_channels if branches.deform else None, self.cnn.out_channels,
                                    hidden=fusion_hidden, final_stride=patch_size // 8, deform_impl=deform_impl)
            channels += self.cnn.out_channels
        self.head = QualityHead(channels, dim=head_dim, hidden=head_hidden, pooling=pooling)
        self.freeze_backbones = freeze_backbones
        if freeze_backbones:
            for p in self.backbone_parameters():
                p.requires_grad_(False)
        self.train(False)

    def backbones(self) -> list[nn.Module]:
        """The feature extractors this variant has (the ViT, the CNN, or both)."""
        return [branch for branch in (self.vit, self.cnn) if branch is not None]

    def backbone_parameters(self):
        for branch in self.backbones():
            yield from branch.parameters()

    @property
    def no_maps(self) -> str | None:
        """Why this model has no quality maps (its pooling's reason), or None: its score is their weighted mean."""
        return self.head.pooling.no_maps

    def train(self, mode: bool = True) -> "AHIQ":
        super().train(mode)
        if self.freeze_backbones:  # frozen backbones keep their BatchNorm statistics and no dropout
            for branch in self.backbones():
                branch.eval()
        # Fine-tuned backbones train their BatchNorm scale and shift, never their statistics: normalising by
        # the batch would make an image's result depend on the others in its batch, and under torchrun on how
        # the global batch is shared out (each process its own share, its padding copies included).
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def _backbones(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # Frozen backbones run without autograd (training the head needs nothing of them), unless a gradient
        # with respect to the input itself is asked for (AHIQ as a loss).
        needs_autograd = not self.freeze_backbones or x.requires_grad
        x = (x - 0.5) / 0.5  # the official normalisation, for both backbones
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_autograd):
            return (None if self.vit is None else self.vit(x)), (None if self.cnn is None else self.cnn(x))

    def _reduced(self, vit: torch.Tensor | None, cnn: torch.Tensor | None, offset: torch.Tensor | None) -> torch.Tensor:
        """The head's 1x1 reduction of cat(ViT, CNN fused with ``offset``), of the branches there are."""
        parts = [t for t in (vit, None if cnn is None else self.fusion(cnn, offset)) if t is not None]
        return self.head.reduce(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))

    def reference_features(self, ref: torch.Tensor) -> ReferenceFeatures:
        """What scoring needs of the reference crops: the deformable offsets and the head's reduced features.
        Computed once, they serve every distorted image cut at the same windows."""
        vit, cnn = self._backbones(ref)
        offset = self.fusion.offsets(vit, cnn.shape[-2:]) if self.fusion is not None and self.fusion.deformable else None
        return ReferenceFeatures(offset, self._reduced(vit, cnn, offset))

    def score_with_reference(self, dist: torch.Tensor, ref: ReferenceFeatures) -> torch.Tensor:
        """Scores of distorted crops [G * B, 3, S, S] against reference features of B crops (crop i of the
        distorted batch uses reference crop i mod B): [G * B]."""
        return self.predict_with_reference(dist, ref).score

    def predict_with_reference(self, dist: torch.Tensor, ref: ReferenceFeatures) -> Pooled:
        """The scores [G * B] (fp32 at least), with the score map and the weight map [G * B, 1, h, w] on the
        ViT grid whose weighted mean they are (None for a pooling without maps, ``no_maps``)."""
        return self.head.predict(self._reduced(*self._backbones(dist), ref.offset), ref.reduced)

    def score_with_maps(self, dist: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass: scores [B], and the score map and weight map [B, h, w] on the ViT grid (28 x 28
        for patch 8, 14 x 14 for patch 16) whose weighted mean the score is."""
        if self.no_maps:
            raise ValueError(self.no_maps)
        pooled = self.predict_with_reference(dist, self.reference_features(ref))
        return pooled.score, pooled.score_map[:, 0], pooled.weight_map[:, 0]

    def forward(self, dist: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if dist.shape != ref.shape:
            raise ValueError(f"distorted and reference batches differ in shape: {tuple(dist.shape)} vs {tuple(ref.shape)}")
        return self.score_with_reference(dist, self.reference_features(ref))

    # ---- checkpoints -------------------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds: fusion and head, and the backbones when they are fine-tuned."""
        prefixes = ("fusion.", "head.") if self.freeze_backbones else ("",)
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def checkpoint(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": dict(self.config),
                "model": self.trained_state_dict()}

    def save_checkpoint(self, path: str | os.PathLike, **extra: Any) -> None:
        atomic_save({**self.checkpoint(), **extra}, path)

    def save_official_checkpoint(self, path: str | os.PathLike) -> None:
        """The fusion and head in the official released format (``deform_net_model_state_dict`` and
        ``regressor_model_state_dict``), which the official code loads: only the paper's AHIQ variant with
        frozen backbones fits it."""
        variant = {k: self.config[k] for k in AHIQ_VARIANT}
        if variant != AHIQ_VARIANT or not self.freeze_backbones:
            what = (", ".join(f"model.{k}={v}" for k, v in variant.items() if v != AHIQ_VARIANT[k])
                    or "fine-tuned backbones")
            raise WeightsError(f"{path}: the official format holds only AHIQ's fusion and head (model.fusion="
                               f"deform+concat, model.cnn=resnet50, model.pooling=patch, frozen backbones), which the "
                               f"official code reads; this model has {what}: save it with save_checkpoint")
        atomic_save(ahiq_to_official(self.state_dict()), path)

    def restore(self, saved: Any, path: Path, advice: str = FROM_PRETRAINED) -> dict[str, Any]:
        """Load the weights of a checkpoint already read from ``path`` (named in errors) into this model:
        the official released format or this project's. Returns ``saved``. ``advice``: what to do when the
        checkpoint is of another architecture. To obtain a trained model, use AHIQ.from_pretrained."""
        project = _is_project_checkpoint(saved, path)
        self._check_config(saved_config(saved, project), path, advice)
        if project:
            state = saved["model"]
        else:
            self._check_official_patch_size(path)
            state = official_to_ahiq(saved)
        own = self.state_dict()
        expected = {k: v for k, v in own.items() if k.startswith(("fusion.", "head."))}
        if any(k.startswith(("vit.", "cnn.")) for k in state):  # a checkpoint with fine-tuned backbones
            expected = own
        check_state_dict(expected, state, f"checkpoint {path}")
        self.load_state_dict(state, strict=False)
        return saved

    def _check_config(self, saved: dict, path: Path, advice: str) -> None:
        differ = [f"{k}={saved[k]!r} (this model: {v!r})" for k, v in self.config.items() if k in saved and saved[k] != v]
        if differ:
            raise WeightsError(f"checkpoint {path} was saved for another architecture: {', '.join(differ)}. {advice}")

    def _check_official_patch_size(self, path: Path) -> None:
        # Patch 8 and 16 heads have identically shaped weights (only a stride differs), so the released
        # file names (AHIQ_vit_p8_epoch33-...) are the only way to tell them apart.
        named = re.search(r"vit_p(8|16)(?!\d)", path.name)
        if named and int(named.group(1)) != self.config["patch_size"]:
            raise WeightsError(f"checkpoint {path} is named for patch size {named.group(1)}, this model has "
                               f"patch_size={self.config['patch_size']}; set model.patch_size={named.group(1)} "
                               f"(patch_size={named.group(1)} in Python)")

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike = "pipal", *, allow_random_backbones: bool = False,
                        **model_options: Any) -> "AHIQ":
        """A trained AHIQ: the one way to obtain one.

        ``checkpoint``: a released model's name (``pipal``, the NTIRE 2022 winner; ahiq.nn.zoo), a checkpoint
        file (official or this project's), or a weights folder holding a released file (``python -m ahiq
        download --dir``). ``model_options``: the ``model`` options (ahiq.options.DEFAULTS), the same
        defaults everywhere: ``weights`` (a weights folder: files only from there, no network),
        ``vit_pretrained`` / ``cnn_pretrained`` (True: the released backbone weights by ahiq.nn.zoo's rule; a
        file; False: random), ``patch_size`` and the sizes (for official files given by path; the released
        models and this project's checkpoints carry their own), ``freeze_backbones``, ``deform_impl``.

        Every file the model needs (the checkpoint, the backbones) is found first, and all that are missing
        are named in one error. A backbone that neither the checkpoint nor a pretrained source provides would
        be random, and scores would change from run to run: refused unless ``allow_random_backbones``."""
        from ahiq.options import DEFAULTS

        unknown = sorted(set(model_options) - set(DEFAULTS["model"]))
        if unknown:
            raise TypeError(f"AHIQ.from_pretrained got unknown model options {', '.join(unknown)}; known: "
                            f"{', '.join(DEFAULTS['model'])}")
        opt = {**DEFAULTS["model"], **model_options}
        weights, name = opt["weights"], None
        if isinstance(checkpoint, (str, os.PathLike)) and Path(checkpoint).is_dir():
            weights, name = checkpoint, _released_in(Path(checkpoint))
        elif is_zoo_name(checkpoint):
            name = checkpoint
        if name is not None:  # a released model: its own architecture; the file and the backbones found together
            opt.update(AHIQ_VARIANT, patch_size=ZOO[name].patch_size)
            wanted = backbone_files(opt)
            path, *backbones = locate([ZOO[name].file, *wanted.values()], weights)
            saved = read_weight_file(path)
        else:
            path = Path(checkpoint)
            saved = read_weight_file(path)  # read once: a checkpoint with fine-tuned backbones is large
        project = _is_project_checkpoint(saved, path)
        held = saved["model"].keys() if project else ()  # official files hold no backbones
        # the architecture it was saved for (official files: AHIQ's)
        opt.update({k: v for k, v in saved_config(saved, project).items() if k in opt})
        if name is None:
            wanted = backbone_files(opt, held)
            backbones = locate(list(wanted.values()), weights)
        opt.update(zip(wanted, backbones))
        opt.update({option: False for option, _, prefix in _backbone_options(opt) if _holds(held, prefix)})
        model = _build(opt)
        model.restore(saved, path)  # a checkpoint that does not fit is the first thing to report
        model.source = path  # the file the model came from, and where its backbones' weights came from
        model.backbone_sources = tuple("checkpoint" if _holds(held, prefix) else str(opt[option])
                                       for option, _, prefix in _backbone_options(opt))
        random = [(option, what) for option, what, prefix in _backbone_options(opt)
                  if opt[option] is False and not _holds(held, prefix)]
        if random and not allow_random_backbones:
            options = " and ".join(f"model.{o} (--{o.replace('_', '-')})" for o, _ in random)
            raise WeightsError(f"checkpoint {path} holds no {' or '.join(w for _, w in random)} weights and "
                               f"{options} {'are' if len(random) > 1 else 'is'} false: the scores would come from "
                               f"random backbone weights; set it to true (the released weights) or a weight file, "
                               f"or allow it with allow_random_backbones (test.allow_random_backbones=true, "
                               f"--allow-random-backbones)")
        return model


def _is_project_checkpoint(saved: Any, path: Path) -> bool:
    """Whether ``saved`` (read from ``path``) is this project's checkpoint (else the official format); neither
    is a WeightsError."""
    if isinstance(saved, dict) and saved.get("format") == CHECKPOINT_FORMAT:
        return True
    if isinstance(saved, dict) and all(section in saved for section in OFFICIAL_MODULES):
        return False
    keys = listed(list(map(str, saved)), 6) if isinstance(saved, dict) else type(saved).__name__
    raise WeightsError(f"{path} is not an AHIQ checkpoint (top level: {keys}); expected the official format "
                       f"({' + '.join(OFFICIAL_MODULES)}) or this project's ('format': 'ahiq')")


def saved_config(saved: dict, project: bool) -> dict:
    """The architecture a checkpoint was saved for: its config (one written before the variants existed is
    AHIQ), or for an official file AHIQ's variant (its patch size is told by its name)."""
    return {**AHIQ_VARIANT, **(saved.get("config", {}) if project else {})}


def _backbone_options(opt: dict) -> list[tuple[str, str, str]]:
    """(option, what, state-dict prefix) of each backbone the model of the options ``opt`` builds."""
    branches = FUSIONS[opt["fusion"]]
    return ([("vit_pretrained", "ViT", "vit.")] if branches.vit else []) + \
        ([("cnn_pretrained", CNN_BACKBONES[opt["cnn"]].label, "cnn.")] if branches.cnn else [])


def _holds(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def backbone_files(opt: dict, held=()) -> dict:
    """{option: released backbone file} for the pretrained options that are ``True`` of the backbones the
    model builds, except those the checkpoint holds."""
    tags, reduced = {}, {}
    if FUSIONS[opt["fusion"]].vit:
        tags["vit_pretrained"] = VIT_TAGS[opt["patch_size"]]
        reduced["vit_pretrained"] = vit_overrides(opt["img_size"], opt["vit_dim"], opt["vit_heads"])
    if FUSIONS[opt["fusion"]].cnn:
        tags["cnn_pretrained"] = CNN_BACKBONES[opt["cnn"]].tag
        reduced["cnn_pretrained"] = CNN_BACKBONES[opt["cnn"]].narrowed(opt["cnn_width"])
    wanted = [option for option, _, prefix in _backbone_options(opt) if opt[option] is True and not _holds(held, prefix)]
    for option in wanted:
        if reduced[option]:
            raise ValueError(f"model.{option} is true, but {tags[option]} with {reduced[option]} is a reduced "
                             f"configuration: it has no pretrained weights; set it to false or a weight file")
    return {option: BACKBONES[tags[option]] for option in wanted}


def _released_in(folder: Path) -> str:
    """The zoo name of the one released file in a weights folder."""
    names = [name for name, model in ZOO.items() if find(model.file, folder) is not None]
    if len(names) != 1:
        released = ", ".join(model.file.name for model in ZOO.values())
        raise WeightsError(f"checkpoint folder {folder} holds {'no' if not names else len(names)} released AHIQ "
                           f"files ({released}); give a file, or a folder from python -m ahiq download --dir with "
                           f"one model")
    return names[0]


# ---- from the options ----------------------------------------------------------------------------------

SIZE_KEYS = ("img_size", "vit_dim", "vit_heads", "cnn_width", "fusion_hidden", "head_dim", "head_hidden")
ARCHITECTURE_KEYS = (*SIZE_KEYS, *AHIQ_VARIANT)


def check_model_options(model_opt: dict) -> None:
    """What the ``model`` options' network could not honour, as one ValueError naming the option, before it is
    built (a CNN branch's crop size and width: ahiq.nn.backbones.check_cnn)."""
    if FUSIONS[model_opt["fusion"]].cnn:
        check_cnn(model_opt["cnn"], model_opt["img_size"], model_opt["patch_size"], model_opt["cnn_width"])


def build_model(model_opt: dict) -> AHIQ:
    """A new AHIQ from the ``model`` options, for training: the pretrained backbones found (both in one
    search, so that one error names every missing file) by the rule of ahiq.nn.zoo."""
    wanted = backbone_files(model_opt)
    return _build({**model_opt, **dict(zip(wanted, locate(list(wanted.values()), model_opt["weights"])))})


def _build(opt: dict) -> AHIQ:
    return AHIQ(opt["patch_size"], opt["vit_pretrained"], opt["cnn_pretrained"], freeze_backbones=opt["freeze_backbones"],
                deform_impl=opt["deform_impl"], **{k: opt[k] for k in ARCHITECTURE_KEYS})
