"""AHIQ: the whole network, and its checkpoints (the official released format and the project's own)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ahiq.messages import listed
from ahiq.nn.backbones import Pretrained, ResNetLayer1Features, ViTFeatures, resnet_overrides, vit_overrides
from ahiq.nn.downloads import locate
from ahiq.nn.fusion import DeformFusion
from ahiq.nn.head import PatchHead, weighted_mean
from ahiq.nn.weights import WeightsError, atomic_save, check_state_dict, read_weight_file
from ahiq.nn.zoo import BACKBONES, RESNET_TAG, VIT_TAGS, ZOO, find, is_zoo_name

CHECKPOINT_FORMAT = "ahiq"
CHECKPOINT_VERSION = 1

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
    offset: torch.Tensor   # [B, 18, H, W] deformable offsets on the CNN grid
    reduced: torch.Tensor  # [B, head_dim, h, w] the head's 1x1 reduction of cat(ViT, fused CNN)


FROM_PRETRAINED = "Load it with AHIQ.from_pretrained, which builds the architecture it was saved for"


class AHIQ(nn.Module):
    """Attention-based Hybrid IQA (Lao, Gong et al., CVPRW 2022), full-reference.

    ``model(dist, ref)`` takes RGB tensors in [0, 1] of shape [B, 3, img_size, img_size] and returns [B]
    scores. The keyword arguments after ``cnn_pretrained`` shrink the network for tests and the demo; the
    defaults are the paper's.
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
        freeze_backbones: bool = True,
        deform_impl: str = "bilinear",
    ):
        super().__init__()
        # What a checkpoint must agree on; pretrained sources and implementation choices are not part of it.
        self.config = dict(patch_size=patch_size, img_size=img_size, vit_dim=vit_dim, vit_heads=vit_heads,
                           cnn_width=cnn_width, fusion_hidden=fusion_hidden, head_dim=head_dim,
                           head_hidden=head_hidden)
        self.vit = ViTFeatures(patch_size, vit_pretrained, img_size=img_size, dim=vit_dim, heads=vit_heads)
        self.cnn = ResNetLayer1Features(cnn_pretrained, width=cnn_width)
        # The CNN grid is img_size / 4; the fusion's two convolutions bring it down to the ViT grid.
        self.fusion = DeformFusion(self.vit.out_channels, self.cnn.out_channels, hidden=fusion_hidden,
                                   final_stride=patch_size // 8, deform_impl=deform_impl)
        self.head = PatchHead(self.vit.out_channels + self.cnn.out_channels, dim=head_dim, hidden=head_hidden)
        self.freeze_backbones = freeze_backbones
        if freeze_backbones:
            for p in self.backbone_parameters():
                p.requires_grad_(False)
        self.train(False)

    def backbone_parameters(self):
        yield from self.vit.parameters()
        yield from self.cnn.parameters()

    def train(self, mode: bool = True) -> "AHIQ":
        super().train(mode)
        if self.freeze_backbones:  # frozen backbones keep their BatchNorm statistics and no dropout
            self.vit.eval()
            self.cnn.eval()
        # Fine-tuned backbones train their BatchNorm scale and shift, never their statistics: normalising by
        # the batch would make an image's result depend on the others in its batch, and under torchrun on how
        # the global batch is shared out (each process its own share, its padding copies included).
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def _backbones(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Frozen backbones run without autograd (training the head needs nothing of them), unless a gradient
        # with respect to the input itself is asked for (AHIQ as a loss).
        needs_autograd = not self.freeze_backbones or x.requires_grad
        x = (x - 0.5) / 0.5  # the official normalisation, for both backbones
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_autograd):
            return self.vit(x), self.cnn(x)

    def _reduced(self, vit: torch.Tensor, cnn: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """The head's 1x1 reduction of cat(ViT, CNN fused with ``offset``)."""
        return self.head.reduce(torch.cat((vit, self.fusion(cnn, offset)), dim=1))

    def reference_features(self, ref: torch.Tensor) -> ReferenceFeatures:
        """What scoring needs of the reference crops: the deformable offsets and the head's reduced features.
        Computed once, they serve every distorted image cut at the same windows."""
        vit, cnn = self._backbones(ref)
        offset = self.fusion.offsets(vit, cnn.shape[-2:])
        return ReferenceFeatures(offset, self._reduced(vit, cnn, offset))

    def score_with_reference(self, dist: torch.Tensor, ref: ReferenceFeatures) -> torch.Tensor:
        """Scores of distorted crops [G * B, 3, S, S] against reference features of B crops (crop i of the
        distorted batch uses reference crop i mod B): [G * B]."""
        return weighted_mean(*self.maps_with_reference(dist, ref))

    def maps_with_reference(self, dist: torch.Tensor, ref: ReferenceFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """The score map and the weight map [G * B, 1, h, w] on the ViT grid whose weighted mean is the score."""
        return self.head.maps(self._reduced(*self._backbones(dist), ref.offset), ref.reduced)

    def score_with_maps(self, dist: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward pass: scores [B], and the score map and weight map [B, h, w] on the ViT grid (28 x 28
        for patch 8, 14 x 14 for patch 16) whose weighted mean the score is."""
        score_map, weight_map = self.maps_with_reference(dist, self.reference_features(ref))
        return weighted_mean(score_map, weight_map), score_map[:, 0], weight_map[:, 0]

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

    def restore(self, saved: Any, path: Path, advice: str = FROM_PRETRAINED) -> dict[str, Any]:
        """Load the weights of a checkpoint already read from ``path`` (named in errors) into this model:
        the official released format or this project's. Returns ``saved``. ``advice``: what to do when the
        checkpoint is of another architecture. To obtain a trained model, use AHIQ.from_pretrained."""
        if _is_project_checkpoint(saved, path):
            self._check_config(saved.get("config", {}), path, advice)
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
        if name is not None:  # a released model: its own patch size; the file and the backbones found together
            opt["patch_size"] = ZOO[name].patch_size
            wanted = _backbone_files(opt)
            path, *backbones = locate([ZOO[name].file, *wanted.values()], weights)
            saved = read_weight_file(path)
        else:
            path = Path(checkpoint)
            saved = read_weight_file(path)  # read once: a checkpoint with fine-tuned backbones is large
        project = _is_project_checkpoint(saved, path)
        held = saved["model"].keys() if project else ()  # official files hold no backbones
        if project:  # the architecture it was saved for
            opt.update({k: v for k, v in saved.get("config", {}).items() if k in opt})
        if name is None:
            wanted = _backbone_files(opt, held)
            backbones = locate(list(wanted.values()), weights)
        opt.update(zip(wanted, backbones))
        opt.update({option: False for option, _, prefix in _BACKBONE_OPTIONS if _holds(held, prefix)})
        model = _build(opt)
        model.restore(saved, path)  # a checkpoint that does not fit is the first thing to report
        model.source = path  # the file the model came from, and where its backbones' weights came from
        model.backbone_sources = tuple("checkpoint" if _holds(held, prefix) else str(opt[option])
                                       for option, _, prefix in _BACKBONE_OPTIONS)
        random = [(option, what) for option, what, prefix in _BACKBONE_OPTIONS
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


# (option, what, state-dict prefix) of each backbone
_BACKBONE_OPTIONS = (("vit_pretrained", "ViT", "vit."), ("cnn_pretrained", "ResNet", "cnn."))


def _backbone_tags(patch_size: int) -> dict[str, str]:
    return {"vit_pretrained": VIT_TAGS[patch_size], "cnn_pretrained": RESNET_TAG}


def _holds(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _backbone_files(opt: dict, held=()) -> dict:
    """{option: released backbone file} for the pretrained options that are ``True``, except the backbones
    the checkpoint holds."""
    tags = _backbone_tags(opt["patch_size"])
    wanted = [option for option, _, prefix in _BACKBONE_OPTIONS if opt[option] is True and not _holds(held, prefix)]
    reduced = {"vit_pretrained": vit_overrides(opt["img_size"], opt["vit_dim"], opt["vit_heads"]),
               "cnn_pretrained": resnet_overrides(opt["cnn_width"])}
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


def build_model(model_opt: dict) -> AHIQ:
    """A new AHIQ from the ``model`` options, for training: the pretrained backbones found (both in one
    search, so that one error names every missing file) by the rule of ahiq.nn.zoo."""
    wanted = _backbone_files(model_opt)
    return _build({**model_opt, **dict(zip(wanted, locate(list(wanted.values()), model_opt["weights"])))})


def _build(opt: dict) -> AHIQ:
    return AHIQ(opt["patch_size"], opt["vit_pretrained"], opt["cnn_pretrained"], freeze_backbones=opt["freeze_backbones"],
                deform_impl=opt["deform_impl"], **{k: opt[k] for k in SIZE_KEYS})
