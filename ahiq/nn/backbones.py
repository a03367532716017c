"""The frozen feature extractors, built from timm and cut where AHIQ stops reading them.

* ViT: the outputs of transformer blocks 0..4 (class token dropped), concatenated on channels.
* CNN (ahiq.registry.variants.CNNS, the paper's Table 7): the stem, then the output of every block of the stride-4
  stage, concatenated: ResNet50's layer1 (AHIQ), ResNet101's and ResNet152's, HRNet-W18's, and
  InceptionResNetV2's two stride-4 convolutions, whose unpadded windows leave a smaller grid, resampled to
  the others' (a quarter of the input).

The official code runs both networks to the end with a forward hook on every block; everything after
block 4 and after the stride-4 stage is thrown away, so here it is never kept.
"""
from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Union

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ahiq.nn.downloads import locate
from ahiq.nn.weights import WeightsError, check_state_dict, read_weight_file, unwrap_state_dict
from ahiq.nn.zoo import BACKBONES
from ahiq.registry.variants import CNNS, FULL_WIDTH, VITS

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


def resnet_overrides(width: int = FULL_WIDTH) -> dict:
    """timm keyword arguments for a narrower ResNet; none for the real one."""
    return {} if width == FULL_WIDTH else dict(stem_width=width, channels=(width, 2 * width, 4 * width, 8 * width))


def hrnet_overrides(width: int = FULL_WIDTH) -> dict:
    """timm keyword arguments for an HRNet with a narrower stem and stride-4 stage (the later stages, never
    kept, as they are); none for the real one."""
    stage1 = dict(num_modules=1, num_branches=1, block_type="BOTTLENECK", num_blocks=(4,), num_channels=(width,),
                  fuse_method="SUM")
    return {} if width == FULL_WIDTH else dict(stem_width=width, stage1=stage1)


@dataclass(frozen=True)
class Family:
    """How a family of timm CNNs (ahiq.registry.variants.CNN.family) is cut where AHIQ reads it: its stem and the
    blocks of its stride-4 stage; and the timm arguments that narrow it to a base width ({}: the real one, or a
    network timm cannot narrow)."""
    stage: Callable[[nn.Module], tuple[nn.Module, nn.Module]]
    narrowed: Callable[[int], dict]


FAMILIES = {
    "resnet": Family(lambda net: (nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool), net.layer1),
                     resnet_overrides),
    "hrnet": Family(lambda net: (nn.Sequential(net.conv1, net.bn1, net.act1, net.conv2, net.bn2, net.act2), net.layer1),
                    hrnet_overrides),
    "inception_resnet": Family(lambda net: (nn.Sequential(net.conv2d_1a, net.conv2d_2a, net.conv2d_2b, net.maxpool_3a),
                                            nn.Sequential(net.conv2d_3b, net.conv2d_4a)), lambda width: {}),
}


def cnn_overrides(name: str, width: int) -> dict:
    """timm keyword arguments for the CNN branch ``name`` of base width ``width``; none for the real one."""
    return FAMILIES[CNNS[name].family].narrowed(width)


class ViTFeatures(nn.Module):
    """Blocks 0..4 of a timm ViT: [B, 3, S, S] -> [B, 5 * dim, S / patch, S / patch]."""

    def __init__(self, patch_size: int, pretrained: Pretrained, img_size: int = 224, dim: int = 768, heads: int = 12):
        super().__init__()
        tag = VITS.choice(patch_size, "patch_size").tag
        vit = create_timm_model(tag, pretrained, **vit_overrides(img_size, dim, heads))
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


class CNNFeatures(nn.Module):
    """The stem and the stride-4 stage of a timm CNN (ahiq.registry.variants.CNNS): [B, 3, S, S] -> [B, C, S / 4,
    S / 4], every block's output of the stage concatenated (ResNet50: 3 * 4 * width channels)."""

    def __init__(self, name: str, pretrained: Pretrained, width: int = FULL_WIDTH):
        super().__init__()
        cnn = CNNS.choice(name, "cnn")
        net = create_timm_model(cnn.tag, pretrained, **cnn_overrides(name, width))
        self.stem, self.layer1 = FAMILIES[cnn.family].stage(net)
        self.out_channels = cnn.channels(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // 4, x.shape[-1] // 4)
        x = self.stem(x)
        outputs = []
        for block in self.layer1:
            x = block(x)
            # InceptionResNetV2's unpadded convolutions leave 54 and 52 where the others have 56 (at 224):
            # resampled to the common grid, which the fusion brings to the ViT's
            outputs.append(x if x.shape[-2:] == grid else F.interpolate(x, size=grid, mode="bilinear",
                                                                           align_corners=False))
        return torch.cat(outputs, dim=1)
