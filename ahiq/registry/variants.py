"""The paper's variants of AHIQ and its ablation tables (Tables 6, 7 and 8): the fusions (``model.fusion``), the
CNN branches (``model.cnn``), the ViTs (``model.patch_size``) and the poolings (``model.pooling``), each with
what the network builds for it (ahiq.nn reads these), its row in its table, and the paper's figures for that row.
The first of each kind is AHIQ's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ahiq.registry import Choice, Registry

FULL_WIDTH = 64  # a ResNet's and an HRNet's base width: the real networks (model.cnn_width)


@dataclass(frozen=True, kw_only=True)
class Variant(Choice):
    """``label``: its name in the paper's tables and in messages; ``paper``: the paper's PLCC, SROCC and (Tables 7
    and 8) main score of its row on the NTIRE 2022 test set, () where the paper has no such row; ``slug``: what
    scripts/run_ablations.py appends to the experiment's name for its row (default: its name)."""
    label: str
    paper: tuple[float, ...] = ()
    slug: str | None = None


@dataclass(frozen=True, kw_only=True)
class Fusion(Variant):
    """Which branches a model builds: ``vit`` (its features go to the head) and ``cnn`` (its features brought to
    the ViT grid by ahiq.nn.fusion.CNNFusion, then to the head beside the ViT's), and whether ``deform``: the CNN
    features go through the deformable convolution steered by the reference's ViT features."""
    vit: bool
    cnn: bool
    deform: bool


@dataclass(frozen=True, kw_only=True)
class CNN(Variant):
    """One CNN branch, read at its stride-4 stage: the timm weights it starts from (``tag``, also found under its
    original release's names ``also_named``), how it is cut and narrowed (``family``: ahiq.nn.backbones.FAMILIES),
    the channels its stage gives for a base width, the smallest crop its stem takes, and whether timm takes a
    base width for it (``model.cnn_width``)."""
    tag: str
    family: str
    channels: Callable[[int], int]
    also_named: tuple[str, ...] = ()
    min_crop: int = 1
    narrowable: bool = True
    cell: str | None = None  # its name in the paper's table, where not its label

    def check(self, img_size: int, patch_size: int, width: int) -> None:
        """A ValueError naming the option when this CNN cannot honour ``model.img_size`` or ``model.cnn_width``:
        checked from the options alone, before a model is built or an ablation row trains."""
        if img_size < self.min_crop:
            raise ValueError(f"model.img_size {img_size} is too small for model.cnn {self.name}: its unpadded stem "
                             f"needs crops of at least {self.min_crop} pixels; set model.img_size="
                             f"{-(-self.min_crop // patch_size) * patch_size} or more")
        if not self.narrowable and width != FULL_WIDTH:
            raise ValueError(f"model.cnn_width {width}: timm's {self.label} has no width to narrow; leave "
                             f"model.cnn_width at {FULL_WIDTH} with model.cnn {self.name}")


@dataclass(frozen=True, kw_only=True)
class ViT(Variant):
    """The ViT-B of a patch size: the timm weights (``tag``; the AugReg ``.npz`` of its original release,
    ``also_named``)."""
    tag: str
    also_named: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Pooling(Variant):
    """How the head's feature map [N, dim, h, w] becomes a score: ``patch``, a score map and a weight map
    (sigmoid) from 1x1 convolutions, pooled by their weighted mean; ``spatial``, the features averaged over
    the grid, then regressed by a two-layer MLP (one linear layer after the average would equal the plain
    mean of a linear score map: patch-wise prediction without its weights, not another pooling). Both: the
    mean of the two scores. ``no_maps``: why the pooling has no quality maps (None: its score is their
    weighted mean)."""
    patch: bool
    spatial: bool
    no_maps: str | None = None


FUSIONS: Registry[Fusion] = Registry("model.fusion", [
    Fusion(name="deform+concat", summary="AHIQ", label="deform+concat", vit=True, cnn=True, deform=True,
           paper=(0.823, 0.813)),
    Fusion(name="concat", summary="no deformable convolution", label="concat", vit=True, cnn=True, deform=False,
           paper=(0.810, 0.799)),
    Fusion(name="cnn", summary="the CNN branch alone", label="CNN alone", vit=False, cnn=True, deform=False,
           paper=(0.792, 0.789), slug="cnn-only"),
    Fusion(name="vit", summary="the ViT branch alone", label="ViT alone", vit=True, cnn=False, deform=False,
           paper=(0.799, 0.788), slug="vit-only"),
])


def _augreg(patch: int) -> str:
    return (f"B_{patch}-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-"
            f"res_224.npz")


# The backbone weights the released heads were trained with are timm 0.5.4's defaults (what the official code's
# timm.create_model(..., pretrained=True) gave), which current timm names with these tags (its untagged
# vit_base_patch8_224 now means augreg2 weights, which are different); the other CNNs' too, also found under the
# name timm 0.5.4 saved them by where current timm still records it.
VITS: Registry[ViT] = Registry("model.patch_size", [
    ViT(name=8, summary="ViT-B/8", label="ViT-B/8", tag="vit_base_patch8_224.augreg_in21k_ft_in1k",
        also_named=(_augreg(8),)),
    ViT(name=16, summary="ViT-B/16", label="ViT-B/16", tag="vit_base_patch16_224.augreg_in21k_ft_in1k",
        also_named=(_augreg(16),), paper=(0.811, 0.803, 1.614), slug="vit-b16"),
])

CNNS: Registry[CNN] = Registry("model.cnn", [
    CNN(name="resnet50", summary="ResNet50", label="ResNet50", tag="resnet50.a1_in1k", family="resnet",
        channels=lambda w: 3 * 4 * w, also_named=("resnet50_a1_0-14fe96d1.pth",), paper=(0.823, 0.813, 1.636)),
    CNN(name="resnet101", summary="ResNet101", label="ResNet101", tag="resnet101.a1h_in1k", family="resnet",
        channels=lambda w: 3 * 4 * w, also_named=("resnet101_a1h-36d3f2aa.pth",), paper=(0.802, 0.788, 1.590)),
    CNN(name="resnet152", summary="ResNet152", label="ResNet152", tag="resnet152.a1h_in1k", family="resnet",
        channels=lambda w: 3 * 4 * w, also_named=("resnet152_a1h-dc400468.pth",), paper=(0.807, 0.793, 1.600)),
    CNN(name="hrnet_w18", summary="HRNet-W18", label="HRNet-W18", cell="HRNet (W18)", tag="hrnet_w18.ms_in1k",
        family="hrnet", channels=lambda w: 4 * 4 * w, paper=(0.806, 0.796, 1.601)),
    # timm's InceptionResNetV2 has no width argument; its stride-4 stage is small (0.14M weights) as it is;
    # its unpadded 3x3 convolutions and pooling (conv2d_1a, 2a, maxpool_3a, conv2d_4a) need 19 pixels
    CNN(name="inception_resnet_v2", summary="InceptionResNetV2", label="InceptionResNetV2",
        tag="inception_resnet_v2.tf_in1k", family="inception_resnet", channels=lambda w: 80 + 192, min_crop=19,
        narrowable=False, paper=(0.806, 0.793, 1.599)),
])

POOLINGS: Registry[Pooling] = Registry("model.pooling", [
    Pooling(name="patch", summary="score map weighted by the weight map, AHIQ", label="patch", patch=True,
            spatial=False, paper=(0.823, 0.813, 1.636)),
    Pooling(name="spatial", summary="features averaged, then regressed", label="spatial", patch=False, spatial=True,
            paper=(0.794, 0.795, 1.589),
            no_maps="a model with model.pooling=spatial has no quality maps: it regresses its score from features "
                    "averaged over the crop, with no score or weight map"),
    Pooling(name="patch+spatial", summary="the mean of both", label="patch + spatial", patch=True, spatial=True,
            paper=(0.801, 0.791, 1.593),
            no_maps="a model with model.pooling=patch+spatial has no quality maps: half its score is regressed from "
                    "features averaged over the crop, so the maps' weighted mean is not its score"),
])

# The model options a variant sets, with their kinds: AHIQ is the first of each.
VARIANTS: dict[str, Registry] = {"fusion": FUSIONS, "cnn": CNNS, "pooling": POOLINGS, "patch_size": VITS}
AHIQ = {option: kind.default.name for option, kind in VARIANTS.items()}


# ---- the ablation tables -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AblationRow:
    cells: tuple[str, ...]    # the paper's first columns
    variant: dict             # the model options that differ from AHIQ ({}: AHIQ itself)
    paper: tuple[float, ...]  # the paper's figures, () where it has none
    slug: str                 # the experiment's suffix: ahiq, or the variant's
    fixed: tuple = ()         # (model option, value, why) the row sets whatever the options say


@dataclass(frozen=True)
class AblationTable:
    """A table of the paper: its title, first columns, and the model options whose variants are its rows (the
    first option's AHIQ is the AHIQ row; the others' AHIQ is not repeated)."""
    title: str
    columns: tuple[str, ...]
    options: tuple[str, ...]

    def rows(self) -> list[AblationRow]:
        rows = []
        for position, option in enumerate(self.options):
            for number, variant in enumerate(VARIANTS[option].values()):
                ahiq = variant.name == AHIQ[option]
                if ahiq and position:
                    continue
                fixed = ((("cnn_width", FULL_WIDTH, f"timm's {variant.label} has no width to narrow"),)
                         if isinstance(variant, CNN) and not variant.narrowable else ())
                rows.append(AblationRow(_CELLS[option](number, variant), {} if ahiq else {option: variant.name},
                                        variant.paper, "ahiq" if ahiq else variant.slug or str(variant.name), fixed))
        return rows


_CELLS: dict[str, Callable[[int, Variant], tuple[str, ...]]] = {
    "fusion": lambda number, f: (str(number + 1), "yes" if f.cnn else "", "yes" if f.vit else "",
                                 f.name if f.cnn and f.vit else ""),
    "cnn": lambda number, c: (c.cell or c.label, VITS.default.label),
    "patch_size": lambda number, v: (CNNS.default.label, v.label),
    "pooling": lambda number, p: (p.label,),
}

TABLES = {
    6: AblationTable("Table 6: feature fusion (CNN: ResNet50, ViT: ViT-B/8)", ("No", "CNN", "ViT", "fusion"),
                     ("fusion",)),
    7: AblationTable("Table 7: backbones", ("CNN", "ViT"), ("cnn", "patch_size")),
    8: AblationTable("Table 8: pooling", ("pooling",), ("pooling",)),
}
