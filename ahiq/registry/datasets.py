"""The datasets: each one's name in ``data.dataset``, its reader (ahiq.data.readers) and its distortion types and
groups as the dataset names them.

A pair's type is the dataset's own code, read from its file name or folder by the dataset's reader
(``Pair.distortion``): LIVE's folder, CSIQ's token, TID's ``TT`` in ``iXX_TT_L``, KADID-10k's ``TT`` in
``IXX_TT_LL``, PIPAL's ``bb`` in ``Aaaaa_bb_cc``, the demo's distortion, a custom CSV's ``group`` column. The
names come from the datasets' own papers and releases; a code they do not name keeps its code as its name
("PIPAL class 05"), never a guess. Only KADID-10k defines groups coarser than its types (its paper's seven
categories); elsewhere each type is its own group.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ahiq.registry import Choice, Registry


@dataclass(frozen=True)
class Taxonomy:
    """One dataset's distortion types (code -> name, in the dataset's order) and, where it defines coarser
    ones, its groups (code -> (name, member type codes)). ``unnamed``: how a code without a name is called."""
    types: dict[str, str] = field(default_factory=dict, hash=False)
    groups: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict, hash=False)
    unnamed: str = "type {}"

    def name(self, code: str) -> str:
        return self.types.get(code) or self.unnamed.format(code)

    def group(self, code: str) -> str:
        return next((g for g, (_, members) in self.groups.items() if code in members), code)

    def groups_of(self, codes) -> list[str]:
        """The group of each type code ("" for an unknown type)."""
        return [self.group(code) if code else "" for code in codes]

    def group_name(self, group: str) -> str:
        return self.groups[group][0] if group in self.groups else self.name(group)

    def order(self, codes) -> list[str]:
        """``codes`` in the dataset's order, codes it does not list after them in sorted order."""
        known = list(self.types) + [g for g in self.groups if g not in self.types]
        return sorted(set(codes), key=lambda c: (known.index(c) if c in known else len(known), c))


def numbered(names, start: int = 1) -> dict[str, str]:
    """Type codes 01, 02, ... for ``names`` in order."""
    return {f"{i:02d}": name for i, name in enumerate(names, start)}


def categorised(categories: dict) -> Taxonomy:
    """Types numbered 01, 02, ... through the categories in order, each category a group of its types."""
    types, groups = {}, {}
    for group, (label, names) in categories.items():
        codes = numbered(names, len(types) + 1)
        types.update(codes)
        groups[group] = (label, tuple(codes))
    return Taxonomy(types, groups)


@dataclass(frozen=True, kw_only=True)
class Dataset(Choice):
    """``reader``: ``module:function`` reading its labels from the folder it was unpacked in (the function's
    keyword arguments are the ``data.options``); ``taxonomy``: its distortion types and groups."""
    reader: str
    taxonomy: Taxonomy = Taxonomy(unnamed="{}")


# TID2013 (Ponomarenko et al., 2015), whose first 17 are TID2008's (Ponomarenko et al., 2009).
_TID = ("Additive Gaussian noise", "Additive noise in color components", "Spatially correlated noise", "Masked noise",
        "High frequency noise", "Impulse noise", "Quantization noise", "Gaussian blur", "Image denoising",
        "JPEG compression", "JPEG2000 compression", "JPEG transmission errors", "JPEG2000 transmission errors",
        "Non eccentricity pattern noise", "Local block-wise distortions of different intensity",
        "Mean shift (intensity shift)", "Contrast change", "Change of color saturation", "Multiplicative Gaussian noise",
        "Comfort noise", "Lossy compression of noisy images", "Image color quantization with dither",
        "Chromatic aberrations", "Sparse sampling and reconstruction")
# KADID-10k (Lin, Hosu and Saupe, QoMEX 2019): 25 types in 7 categories.
_KADID = {"blurs": ("Blurs", ("Gaussian blur", "Lens blur", "Motion blur")),
          "color": ("Color distortions", ("Color diffusion", "Color shift", "Color quantization",
                                          "Color saturation 1", "Color saturation 2")),
          "compression": ("Compression", ("JPEG2000", "JPEG")),
          "noise": ("Noise", ("White noise", "White noise in color component", "Impulse noise",
                              "Multiplicative noise", "Denoise")),
          "brightness": ("Brightness change", ("Brighten", "Darken", "Mean shift")),
          "spatial": ("Spatial distortions", ("Jitter", "Non-eccentricity patch", "Pixelate", "Quantization",
                                              "Color block")),
          "sharpness": ("Sharpness and contrast", ("High sharpen", "Contrast change"))}
_READERS = "ahiq.data.readers"

DATASETS: Registry[Dataset] = Registry("data.dataset", [
    # PIPAL (Gu et al., 2020) names no class by its code in the file names: each is called by its code.
    Dataset(name="pipal", summary="PIPAL, NTIRE 2022's training set", reader=f"{_READERS}:read_pipal",
            taxonomy=Taxonomy(unnamed="PIPAL class {}")),
    # LIVE release 2 (Sheikh et al., 2006): its five folders.
    Dataset(name="live", summary="LIVE release 2", reader=f"{_READERS}:read_live",
            taxonomy=Taxonomy({"jp2k": "JPEG2000", "jpeg": "JPEG", "wn": "White noise", "gblur": "Gaussian blur",
                               "fastfading": "Fast fading (Rayleigh channel)"})),
    # CSIQ (Larson and Chandler, 2010): the token in its file names, in the distributed case.
    Dataset(name="csiq", summary="CSIQ", reader=f"{_READERS}:read_csiq",
            taxonomy=Taxonomy({"AWGN": "Additive white Gaussian noise", "JPEG": "JPEG", "jpeg2000": "JPEG2000",
                               "fnoise": "Additive pink Gaussian noise", "BLUR": "Gaussian blur",
                               "contrast": "Global contrast decrements"})),
    Dataset(name="tid2013", summary="TID2013", reader=f"{_READERS}:read_tid2013", taxonomy=Taxonomy(numbered(_TID))),
    Dataset(name="tid2008", summary="TID2008", reader=f"{_READERS}:read_tid2008",
            taxonomy=Taxonomy(numbered(_TID[:17]))),
    Dataset(name="kadid10k", summary="KADID-10k", reader=f"{_READERS}:read_kadid10k", taxonomy=categorised(_KADID)),
    Dataset(name="csv", summary="your own `ref,dist,mos` CSV", reader=f"{_READERS}:read_custom_csv"),
    # The demo (ahiq.data.synthetic): its five distortions.
    Dataset(name="synthetic", summary="the generated demo set", reader="ahiq.data.synthetic:read_synthetic",
            taxonomy=Taxonomy({"noise": "Gaussian noise", "blur": "Gaussian blur", "jpeg": "JPEG",
                               "contrast": "Contrast reduction", "quantise": "Quantisation"})),
])


def dataset(name: str, what: str = "data.dataset") -> Dataset:
    """The dataset ``name``, written in any case and with or without ``-``/``_`` (``KADID-10k``, ``TID2013``)."""
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else name
    return DATASETS.choice(key if key in DATASETS else name, what)


def taxonomy(name: str) -> Taxonomy:
    """The taxonomy of the dataset ``name`` (as ``Pairs.dataset`` holds it); an unknown one names codes as they
    are."""
    return DATASETS[name].taxonomy if name in DATASETS else DATASETS["csv"].taxonomy
