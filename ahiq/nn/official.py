"""The official AHIQ compute pattern, kept as the slow, obviously-faithful reference for tests and benchmarks.

It mirrors github IIGROUP/AHIQ: full timm ViT and ResNet50 forwards with a forward hook on every block, the
first five ViT block outputs and the three layer1 Bottleneck outputs read from the hook list, the fusion
module run separately for each image, and module names equal to the official ones, so that
``fusion.state_dict()`` / ``head.state_dict()`` are the released checkpoint's two sections. Never used for
training or scoring.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck
from timm.models.vision_transformer import Block
from torch import nn
from torchvision.ops import DeformConv2d

from ahiq.nn.backbones import resnet_overrides, vit_overrides
from ahiq.registry.variants import CNNS, VITS
from ahiq.nn.model import AHIQ


class OfficialFusion(nn.Module):
    """The official `deform_fusion` (key layout of `deform_net_model_state_dict`)."""

    def __init__(self, patch_size: int, vit_channels: int = 768 * 5, cnn_channels: int = 256 * 3, hidden: int = 512):
        super().__init__()
        self.conv_offset = nn.Conv2d(vit_channels, 2 * 3 * 3, 3, 1, 1)
        self.deform = DeformConv2d(cnn_channels, cnn_channels, 3, 1, 1)
        self.conv1 = nn.Sequential(
            nn.Conv2d(cnn_channels, hidden, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(hidden, cnn_channels, 3, padding=1, stride=1 if patch_size == 8 else 2),
        )

    def forward(self, cnn_feat, vit_feat):
        vit_feat = F.interpolate(vit_feat, size=cnn_feat.shape[-2:], mode="nearest")
        return self.conv1(self.deform(cnn_feat, self.conv_offset(vit_feat)))


class OfficialHead(nn.Module):
    """The official `Pixel_Prediction` (key layout of `regressor_model_state_dict`)."""

    def __init__(self, in_channels: int = 768 * 5 + 256 * 3, dim: int = 256, hidden: int = 1024):
        super().__init__()
        self.down_channel = nn.Conv2d(in_channels, dim, kernel_size=1)
        self.feat_smoothing = nn.Sequential(
            nn.Conv2d(3 * dim, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 2 * dim, 3, padding=1)
        )
        self.conv1 = nn.Sequential(nn.Conv2d(2 * dim, dim, 3, padding=1), nn.ReLU())
        self.conv_attent = nn.Sequential(nn.Conv2d(dim, 1, kernel_size=1), nn.Sigmoid())
        self.conv = nn.Sequential(nn.Conv2d(dim, 1, kernel_size=1))

    def forward(self, f_dis, f_ref, cnn_dis, cnn_ref):
        f_dis = self.down_channel(torch.cat((f_dis, cnn_dis), 1))
        f_ref = self.down_channel(torch.cat((f_ref, cnn_ref), 1))
        feat = self.conv1(self.feat_smoothing(torch.cat((f_dis - f_ref, f_dis, f_ref), 1)))
        f = self.conv(feat)
        w = self.conv_attent(feat)
        return (f * w).sum(dim=2).sum(dim=2) / w.sum(dim=2).sum(dim=2)


class OfficialAHIQ(nn.Module):
    """Full backbones with hooks + the official fusion and head; ``forward(dist, ref)`` -> [B] scores.

    ``vit`` and ``resnet`` are complete timm models (all 12 blocks, all four ResNet stages).
    """

    def __init__(self, vit: nn.Module, resnet: nn.Module, patch_size: int, fusion: OfficialFusion,
                 head: OfficialHead):
        super().__init__()
        self.vit, self.resnet, self.patch_size = vit.eval(), resnet.eval(), patch_size
        self.fusion, self.head = fusion, head
        self.outputs: list[torch.Tensor] = []
        for module in list(resnet.modules()) + list(vit.modules()):
            if isinstance(module, (Bottleneck, Block)):
                module.register_forward_hook(self._keep)  # a bound method: a deep copy hooks into the copy

    def _keep(self, _module, _inputs, output):
        self.outputs.append(output)

    def _vit_feature(self, x):
        self.outputs.clear()
        self.vit(x)
        feat = torch.cat([o[:, 1:, :] for o in self.outputs[:5]], dim=2)
        b, n, c = feat.shape
        side = int(round(n ** 0.5))
        return feat.transpose(1, 2).view(b, c, side, side)

    def _resnet_feature(self, x):
        self.outputs.clear()
        self.resnet(x)
        return torch.cat(self.outputs[:3], dim=1)

    def forward(self, dist, ref):
        dist, ref = (dist - 0.5) / 0.5, (ref - 0.5) / 0.5
        vit_dis = self._vit_feature(dist)
        vit_ref = self._vit_feature(ref)
        cnn_dis = self.fusion(self._resnet_feature(dist), vit_ref)
        cnn_ref = self.fusion(self._resnet_feature(ref), vit_ref)
        self.outputs.clear()
        return self.head(vit_dis, vit_ref, cnn_dis, cnn_ref).squeeze(1)


def random_official_setup(patch_size: int, workdir: str | Path, **model_kwargs):
    """An official-pattern model with random weights, and an AHIQ holding the same weights, loaded through
    the public paths: the backbones as local timm weight files, fusion and head as an official released
    checkpoint (with the optimiser state and numpy loss such a file holds). ``model_kwargs`` are AHIQ's
    size arguments (the paper's sizes when empty). Returns (reference, model, checkpoint path).
    """
    cfg = {k: v.default for k, v in inspect.signature(AHIQ).parameters.items() if v.kind == v.KEYWORD_ONLY}
    cfg.update(model_kwargs)
    workdir = Path(workdir)
    vit = timm.create_model(VITS[patch_size].tag, **vit_overrides(cfg["img_size"], cfg["vit_dim"], cfg["vit_heads"]))
    resnet = timm.create_model(CNNS["resnet50"].tag, **resnet_overrides(cfg["cnn_width"]))
    for m in resnet.modules():  # freshly initialised BatchNorm is the identity: give it statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    vit_ch, cnn_ch = 5 * cfg["vit_dim"], 12 * cfg["cnn_width"]
    fusion = OfficialFusion(patch_size, vit_ch, cnn_ch, hidden=cfg["fusion_hidden"])
    head = OfficialHead(vit_ch + cnn_ch, dim=cfg["head_dim"], hidden=cfg["head_hidden"])
    # Offsets of a few pixels, so that the deformable sampling really moves; and a random head predicts
    # nearly one score for any input, so a larger score layer spreads the scores as a trained model's are.
    nn.init.normal_(fusion.conv_offset.weight, std=3.0 / (vit_ch * 9) ** 0.5)
    nn.init.normal_(head.conv[0].weight, std=30.0 / head.conv[0].in_channels ** 0.5)
    reference = OfficialAHIQ(vit, resnet, patch_size, fusion, head)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), workdir / "vit.pth")
    torch.save(resnet.state_dict(), workdir / "resnet.pth")
    checkpoint = workdir / f"AHIQ_vit_p{patch_size}_epoch33-da3ea303.pth"
    torch.save(official_checkpoint(fusion, head), checkpoint)
    model = AHIQ.from_pretrained(checkpoint, patch_size=patch_size, vit_pretrained=workdir / "vit.pth",
                                 cnn_pretrained=workdir / "resnet.pth", **model_kwargs)
    return reference, model, checkpoint


def official_checkpoint(fusion: nn.Module, head: nn.Module, epoch: int = 32, loss: float = 0.0123) -> dict:
    """The dict the official train.py saves (``save_model``), for ``fusion`` and ``head``: both state dicts,
    the state of its Adam (two parameter groups: regressor, then deformable fusion; moments after a step)
    and of its cosine schedule, the epoch, and the loss as a numpy float64 (``np.mean`` of the losses)."""
    groups = [[p.detach().clone().requires_grad_() for p in module.parameters()] for module in (head, fusion)]
    optimizer = torch.optim.Adam([{"params": group, "lr": 1e-4, "weight_decay": 1e-5} for group in groups])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50, eta_min=0)
    for p in (p for group in groups for p in group):  # the copies step, the modules keep their weights
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    scheduler.step()
    return {"epoch": epoch, "regressor_model_state_dict": head.state_dict(),
            "deform_net_model_state_dict": fusion.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
            "scheduler_state_dict": scheduler.state_dict(), "loss": np.float64(loss)}
