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

from ahiq.nn.downloads import locate
from ahiq.nn.weights import WeightsError, check_state_dict, read_weight_file, unwrap_state_dict
from ahiq.nn.zoo import BACKBONES, RESNET_TAG, VIT_TAGS

VIT_BLOCKS = [0, 1, 2, 3, 4]

Pretrained = Union[bool, str, os.PathLike]


def create_timm_model(tag: str, pretrained: Pretrained, **overrides) -> nn.Module:
    """The timm model ``tag`` with random weights (False), weights from a file (a path: a timm state dict
    as .safetensors/.pth/.bin, or for a ViT the original AugReg .npz), or the released weights found by
    the weight-file rule of ahiq.nn.zoo (True).

    ``overrides`` shrink the architecture for tests and the demo; such a model has no released weights.
    """
    if pretrained is True and overrides:
        raise ValueError(f"{tag} with {overrides} is a reduced configuration: it has no pretrained weights")
    model = timm.create_model(tag, pretrained=False, **overrides)
    if pretrained is False or pretrained is None:
        return model
    path = locate([BACKBONES[tag]])[0] if pretrained is True else Path(pretrained)
    if path.suffix == ".npz":
        _load_augreg_npz(model, tag, path)
        return model
    try:
        state = unwrap_state_dict(read_weight_file(path))
        check_state_dict(model.state_dict(), state, f"pretrained weights {path} for timm '{tag}'")
    except WeightsError as exc:
        raise WeightsError(f"{exc}. Pass a file holding timm's '{tag}' weights.") from exc
    model.load_state_dict(state)
    return model


def _load_augreg_npz(model: nn.Module, tag: str, path: Path) -> None:
    """A ViT's weights from the original JAX release (.npz), through timm's own converter."""
    if not hasattr(model, "load_pretrained"):
        raise WeightsError(f"{path} is a JAX .npz file, which only a ViT reads; give timm '{tag}' weights")
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    try:
        model.load_pretrained(str(path))
    except (KeyError, ValueError, RuntimeError, OSError) as exc:  # a missing key, a wrong shape, not an npz
        raise WeightsError(f"{path} is not the AugReg .npz of timm '{tag}' ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc


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
