"""The two checkpoint formats AHIQ reads: the official released one (``deform_net_model_state_dict`` and
``regressor_model_state_dict``, the fusion and head under the official module names) and this project's
(``format: ahiq``, with the architecture it was saved for); what tells them apart and the architecture each
was saved for."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ahiq.messages import listed
from ahiq.nn.weights import WeightsError
from ahiq.registry.variants import AHIQ

CHECKPOINT_FORMAT = "ahiq"
CHECKPOINT_VERSION = 1
# The variant of the paper's AHIQ (Tables 6, 7, 8): what the official format holds, and what a checkpoint of
# this project's written before the variants existed (its config without these keys) was trained as.
AHIQ_VARIANT = {key: AHIQ[key] for key in ("fusion", "cnn", "pooling")}
SIZE_KEYS = ("img_size", "vit_dim", "vit_heads", "cnn_width", "fusion_hidden", "head_dim", "head_hidden")
ARCHITECTURE_KEYS = (*SIZE_KEYS, *AHIQ_VARIANT)
FROM_PRETRAINED = "Load it with AHIQ.from_pretrained, which builds the architecture it was saved for"

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


def is_project_checkpoint(saved: Any, path: Path) -> bool:
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


def check_config(config: dict, saved: dict, path: Path, advice: str) -> None:
    """A WeightsError naming every architecture setting where the checkpoint's ``saved`` config differs from
    the model's ``config``."""
    differ = [f"{k}={saved[k]!r} (this model: {v!r})" for k, v in config.items() if k in saved and saved[k] != v]
    if differ:
        raise WeightsError(f"checkpoint {path} was saved for another architecture: {', '.join(differ)}. {advice}")


def check_official_patch_size(path: Path, patch_size: int) -> None:
    """Patch 8 and 16 heads have identically shaped weights (only a stride differs), so the released file names
    (AHIQ_vit_p8_epoch33-...) are the only way to tell them apart."""
    named = re.search(r"vit_p(8|16)(?!\d)", path.name)
    if named and int(named.group(1)) != patch_size:
        raise WeightsError(f"checkpoint {path} is named for patch size {named.group(1)}, this model has "
                           f"patch_size={patch_size}; set model.patch_size={named.group(1)} "
                           f"(patch_size={named.group(1)} in Python)")
