"""The two frozen feature extractors, built from timm and cut where AHIQ stops reading them.

* ViT: the outputs of transformer blocks 0..4 (class token dropped), concatenated on channels.
* ResNet50: the stem, then the outputs of the three Bottleneck blocks of layer1, concatenated.

The official code runs both networks to the end with a forward hook on every block; everything after
block 4 and after layer1 is thrown away, so here it is never built.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import timm
import torch
from torch import nn

from .weights import WeightsError, check_state_dict, read_weight_file, unwrap_state_dict

# The released AHIQ heads were trained on timm 0.5.4's default weights. Current timm names them with these
# tags; the untagged `vit_base_patch8_224` now resolves to augreg2 weights, which are different.
VIT_TAGS = {8: "vit_base_patch8_224.augreg_in21k_ft_in1k", 16: "vit_base_patch16_224.augreg_in21k_ft_in1k"}
RESNET_TAG = "resnet50.a1_in1k"
VIT_BLOCKS = [0, 1, 2, 3, 4]

Pretrained = Union[bool, str, os.PathLike]


class PretrainedWeightsError(RuntimeError):
    """Pretrained backbone weights that could not be obtained."""


def create_timm_model(tag: str, pretrained: Pretrained, **overrides) -> nn.Module:
    """The timm model ``tag`` with weights from timm's hub (True), random (False) or a local file (a path).

    ``overrides`` shrink the architecture for tests and the demo; such a model has no hub weights.
    """
    if pretrained is True:
        if overrides:
            raise ValueError(f"{tag} with {overrides} is a reduced configuration: it has no pretrained weights")
        try:
            return timm.create_model(tag, pretrained=True)
        except Exception as exc:  # huggingface_hub raises several types for "no network" / "not cached"
            raise PretrainedWeightsError(
                f"could not get the pretrained timm weights '{tag}' ({type(exc).__name__}: {exc}). "
                f"On a machine with internet, run: python -c \"import timm; timm.create_model('{tag}', pretrained=True)\" "
                f"and copy the file it caches (~/.cache/huggingface/hub/models--timm--{tag}/snapshots/*/model.safetensors) "
                f"here; then pass its path instead of True (option model.vit_pretrained / model.cnn_pretrained)."
            ) from exc
    model = timm.create_model(tag, pretrained=False, **overrides)
    if pretrained is False or pretrained is None:
        return model
    path = Path(pretrained)
    try:
        state = unwrap_state_dict(read_weight_file(path))
        check_state_dict(model.state_dict(), state, f"pretrained weights {path} for timm '{tag}'")
    except WeightsError as exc:
        raise WeightsError(f"{exc}. Pass a file holding timm's '{tag}' weights.") from exc
    model.load_state_dict(state)
    return model


def vit_overrides(img_size: int = 224, dim: int = 768, heads: int = 12) -> dict:
    """timm keyword arguments for a reduced ViT-B; none for the real one."""
    return {} if (img_size, dim, heads) == (224, 768, 12) else dict(img_size=img_size, embed_dim=dim, num_heads=heads)


def resnet_overrides(width: int = 64) -> dict:
    """timm keyword arguments for a narrower ResNet50; none for the real one."""
    return {} if width == 64 else dict(stem_width=width, channels=(width, 2 * width, 4 * width, 8 * width))


class ViTFeatures(nn.Module):
    """Blocks 0..4 of a timm ViT: [B, 3, S, S] -> [B, 5 * dim, S / patch, S / patch]."""

    def __init__(self, patch_size: int, pretrained: Pretrained, img_size: int = 224, dim: int = 768, heads: int = 12):
        super().__init__()
        if patch_size not in VIT_TAGS:
            raise ValueError(f"patch_size must be one of {sorted(VIT_TAGS)}, got {patch_size}")
        vit = create_timm_model(VIT_TAGS[patch_size], pretrained, **vit_overrides(img_size, dim, heads))
        vit.prune_intermediate_layers(VIT_BLOCKS, prune_norm=True, prune_head=True)
        self.vit = vit
        self.grid = img_size // patch_size
        self.out_channels = dim * len(VIT_BLOCKS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_intermediates(
            x, indices=VIT_BLOCKS, stop_early=True, output_fmt="NLC", intermediates_only=True
        )  # class token already dropped
        tokens = torch.cat(tokens, dim=2)  # [B, N, 5 * dim]: block 0's channels first, as the official code
        b, n, c = tokens.shape
        h, w = self.vit.patch_embed.dynamic_feat_size(x.shape[-2:])
        grid = tokens.view(b, h, w, c).permute(0, 3, 1, 2)  # [B, C, h, w] with NHWC strides: no copy
        # channels_last input (runtime.channels_last): keep the free NHWC view, so the convolutions and the
        # concatenation with the channels_last CNN features stay NHWC; otherwise the plain NCHW layout
        return grid if x.is_contiguous(memory_format=torch.channels_last) else grid.contiguous()


class ResNetLayer1Features(nn.Module):
    """Stem and layer1 of a timm ResNet50: [B, 3, S, S] -> [B, 3 * 4 * width, S / 4, S / 4]."""

    def __init__(self, pretrained: Pretrained, width: int = 64):
        super().__init__()
        resnet = create_timm_model(RESNET_TAG, pretrained, **resnet_overrides(width))
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool)
        self.layer1 = resnet.layer1
        self.out_channels = 3 * 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        outputs = []
        for block in self.layer1:
            x = block(x)
            outputs.append(x)
        return torch.cat(outputs, dim=1)
