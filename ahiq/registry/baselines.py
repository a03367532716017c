"""The baseline metrics test.py scores beside AHIQ (``test.baselines``), the paper's Tables 2 and 4: what each
computes, with which settings, on which image sizes, and the weight files the learned ones need
(ahiq.scoring.baselines computes them; ``python -m ahiq download`` fetches their weights)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ahiq.registry import Choice, Registry
from ahiq.registry.weights import WeightFile


@dataclass(frozen=True, kw_only=True)
class Baseline(Choice):
    """``compute``: ``module:name`` of a function ``(x, y, reduction="none", **arguments)`` of [N, 3, H, W] images in
    [0, 1] (piq's, or this project's), or with ``learned`` of a class built once as ``cls(reduction="none")``;
    ``summary`` says what is computed (the docs, and the settings a resumed run must share)."""
    label: str               # as the paper's tables name it
    compute: str
    lower_is_better: bool
    min_size: int            # the smallest image side it computes on
    learned: bool = False
    arguments: dict = field(default_factory=dict, hash=False)
    weights: tuple[WeightFile, ...] = ()  # under the names piq and torchvision download them by

    @property
    def module(self) -> str:
        """The module ``compute`` comes from ("piq", or this project's)."""
        return self.compute.split(":")[0]


# torchvision's ImageNet VGG16 and piq's learned layer weights.
_VGG16 = WeightFile("vgg16-397923af.pth", ("https://download.pytorch.org/models/vgg16-397923af.pth",))
_LPIPS = WeightFile("lpips_weights.pt", ("https://github.com/photosynthesis-team/photosynthesis.metrics/releases/"
                                         "download/v0.4.0/lpips_weights.pt",))
_DISTS = WeightFile("dists_weights.pt", ("https://github.com/photosynthesis-team/piq/releases/download/v0.4.1/"
                                         "dists_weights.pt",))
_RANGE = {"data_range": 1.0}

BASELINES: Registry[Baseline] = Registry("test.baselines", [
    Baseline(name="psnr", label="PSNR", compute="ahiq.scoring.baselines:psnr", lower_is_better=False, min_size=1,
             summary="10 log10(1 / MSE) in double precision, MSE over the RGB channels of [0, 1] images; identical "
                     "images 200 dB"),
    Baseline(name="ssim", label="SSIM", compute="piq:ssim", arguments=_RANGE, lower_is_better=False, min_size=11,
             summary="Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, average-pooled by round(min(H, W) / 256) "
                     "first as Wang et al.'s code; per RGB channel, averaged"),
    Baseline(name="ms_ssim", label="MS-SSIM", compute="piq:multi_scale_ssim", arguments=_RANGE,
             lower_is_better=False, min_size=161,
             summary="five scales with Wang et al.'s 2003 weights, window 11, sigma 1.5; per RGB channel"),
    Baseline(name="fsim", label="FSIMc", compute="piq:fsim", arguments={**_RANGE, "chromatic": True},
             lower_is_better=False, min_size=2,
             summary="FSIM with chrominance (FSIMc), average-pooled by round(min(H, W) / 256) first"),
    Baseline(name="vsi", label="VSI", compute="piq:vsi", arguments=_RANGE, lower_is_better=False, min_size=1,
             summary="piq's defaults (Zhang et al. 2014)"),
    Baseline(name="gmsd", label="GMSD", compute="piq:gmsd", arguments=_RANGE, lower_is_better=True, min_size=1,
             summary="on luminance, average-pooled by 2, T = 170 / 255^2"),
    Baseline(name="vif_p", label="VIF", compute="piq:vif_p", arguments=_RANGE, lower_is_better=False, min_size=41,
             summary="pixel-domain VIF (VIFp), sigma_n^2 = 2, on luminance; not the wavelet-domain VIF of Sheikh "
                     "and Bovik 2006"),
    Baseline(name="lpips", label="LPIPS-VGG", compute="piq:LPIPS", learned=True, lower_is_better=True, min_size=32,
             weights=(_VGG16, _LPIPS),
             summary="VGG16 with LPIPS v0.1 linear weights, ImageNet normalisation, full image"),
    Baseline(name="dists", label="DISTS", compute="piq:DISTS", learned=True, lower_is_better=True, min_size=1,
             weights=(_VGG16, _DISTS),
             summary="VGG16 with L2 pooling and DISTS weights; images resized to 256 on the shorter side when "
                     "larger"),
])
