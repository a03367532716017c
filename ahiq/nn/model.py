"""AHIQ: the whole network, and its checkpoints (their formats: ahiq.nn.checkpoints; finding a trained model's
weights: ahiq.nn.pretrained)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ahiq.nn.backbones import CNNFeatures, Pretrained, ViTFeatures
from ahiq.nn.checkpoints import (AHIQ_VARIANT, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, FROM_PRETRAINED, ahiq_to_official,
                                 check_config, check_official_patch_size, is_project_checkpoint, official_to_ahiq,
                                 saved_config)
from ahiq.nn.fusion import CNNFusion
from ahiq.nn.head import Pooled, QualityHead
from ahiq.nn.pretrained import build, load_pretrained
from ahiq.nn.weights import WeightsError, atomic_save, check_state_dict
from ahiq.registry.released import RELEASED
from ahiq.registry.variants import CNNS, FULL_WIDTH, FUSIONS


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


class AHIQ(nn.Module):
    """Attention-based Hybrid IQA (Lao, Gong et al., CVPRW 2022), full-reference.

    ``model(dist, ref)`` takes RGB tensors in [0, 1] of shape [B, 3, img_size, img_size] and returns [B]
    scores. The sizes after ``cnn_pretrained`` shrink the network for tests and the demo; ``fusion``, ``cnn``
    and ``pooling`` (ahiq.registry.variants) choose the ablations of the paper's Tables 6, 7 and 8. The defaults
    are the paper's AHIQ; a variant builds only the parts it runs.
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
        cnn_width: int = FULL_WIDTH,
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
        branches = FUSIONS.choice(fusion, "fusion")
        if branches.cnn:
            CNNS.choice(cnn, "cnn").check(img_size, patch_size, cnn_width)
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
    def dtype(self) -> torch.dtype:
        """The dtype the model takes its inputs in: its widest parameters' (weights stored in bf16 for autocast,
        ahiq.runtime.device.ResolvedRuntime.prepare, do not change it)."""
        return max((p.dtype for p in self.parameters()), key=lambda dtype: dtype.itemsize)

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
            ahiq = ", ".join(f"model.{k}={v}" for k, v in AHIQ_VARIANT.items())
            raise WeightsError(f"{path}: the official format holds only AHIQ's fusion and head ({ahiq}, frozen "
                               f"backbones), which the official code reads; this model has {what}: save it with "
                               f"save_checkpoint")
        atomic_save(ahiq_to_official(self.state_dict()), path)

    def restore(self, saved: Any, path: Path, advice: str = FROM_PRETRAINED) -> dict[str, Any]:
        """Load the weights of a checkpoint already read from ``path`` (named in errors) into this model:
        the official released format or this project's. Returns ``saved``. ``advice``: what to do when the
        checkpoint is of another architecture. To obtain a trained model, use AHIQ.from_pretrained."""
        project = is_project_checkpoint(saved, path)
        check_config(self.config, saved_config(saved, project), path, advice)
        if project:
            state = saved["model"]
        else:
            check_official_patch_size(path, self.config["patch_size"])
            state = official_to_ahiq(saved)
        own = self.state_dict()
        expected = {k: v for k, v in own.items() if k.startswith(("fusion.", "head."))}
        if any(k.startswith(("vit.", "cnn.")) for k in state):  # a checkpoint with fine-tuned backbones
            expected = own
        check_state_dict(expected, state, f"checkpoint {path}")
        self.load_state_dict(state, strict=False)
        return saved

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike = RELEASED.default.name, *, allow_random_backbones: bool = False,
                        **model_options: Any) -> "AHIQ":
        """A trained AHIQ: the one way to obtain one.

        ``checkpoint``: a released model's name (``pipal``, the NTIRE 2022 winner; ahiq.registry.released), a checkpoint
        file (official or this project's), or a weights folder holding a released file (``python -m ahiq
        download --dir``). ``model_options``: the ``model`` options (ahiq.options.DEFAULTS), the same
        defaults everywhere: ``weights`` (a weights folder: files only from there, no network),
        ``vit_pretrained`` / ``cnn_pretrained`` (True: the released backbone weights by ahiq.nn.zoo's rule; a
        file; False: random), ``patch_size`` and the sizes (for official files given by path; the released
        models and this project's checkpoints carry their own), ``freeze_backbones``, ``deform_impl``.

        Every file the model needs (the checkpoint, the backbones) is found first, and all that are missing
        are named in one error. A backbone that neither the checkpoint nor a pretrained source provides would
        be random, and scores would change from run to run: refused unless ``allow_random_backbones``."""
        return load_pretrained(cls, checkpoint, allow_random_backbones, model_options)


def build_model(model_opt: dict) -> AHIQ:
    """A new AHIQ from the ``model`` options, for training: the pretrained backbones found (both in one
    search, so that one error names every missing file) by the rule of ahiq.nn.zoo."""
    return build(AHIQ, model_opt)
