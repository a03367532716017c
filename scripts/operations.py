#!/usr/bin/env python
"""The operations ahiq and the official compute pattern perform, counted (torch.utils.flop_counter through
scripts/measure.py's count_gflop: matmuls, convolutions and attention, with their gradients; the same on any device),
full size, random weights:

    python scripts/operations.py                      # per pair: evaluation (PIPAL-shaped) and a training step
    python scripts/operations.py --variants           # per crop, and the weights, of every ablation variant

Evaluation is the PIPAL-shaped case: ``--crops`` crops per pair, ``--distortions`` distorted images per reference
(ahiq computes a reference crop's features once for all of them). ``--variants``: each variant of the paper's
Tables 6, 7 and 8 (ahiq.registry.variants) once: GFLOP per reference crop and per distorted crop, the weights
built (all; trained: the fusion's and head's).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=20, help="crops per pair (default 20)")
    parser.add_argument("--distortions", type=int, default=16, help="distorted images per reference (default 16)")
    parser.add_argument("--variants", action="store_true", help="every variant of the ablation tables instead")
    return parser


if __name__ == "__main__":
    arguments().parse_args()  # --help and mistyped arguments answer before torch loads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from ahiq.nn.official import random_official_setup  # noqa: E402
from ahiq.runtime.device import Runtime  # noqa: E402
from benchmark import ahiq_stepper, official_stepper  # noqa: E402
from measure import count_gflop, crop_gflop  # noqa: E402


def pairs(crops: int, per_reference: int) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        reference, model, _ = random_official_setup(8, tmp)
    dist, ref = torch.rand(2, 4, 3, 224, 224)
    with torch.no_grad():
        official_pair = count_gflop(lambda: reference(dist[:1], ref[:1]))
    reference_crop, distorted_crop = crop_gflop(model)
    print(f"flops_eval_pipal_{crops}crop: reference {crops * official_pair:.0f} GFLOP/pair, ahiq "
          f"{crops * (distorted_crop + reference_crop / per_reference):.0f} GFLOP/pair, ratio "
          f"{official_pair / (distorted_crop + reference_crop / per_reference):.2f}x (per crop: reference "
          f"{official_pair:.1f}; ahiq {distorted_crop:.1f} per distorted crop + {reference_crop:.1f} per "
          f"reference crop, shared by {per_reference})", flush=True)
    cpu, target = torch.device("cpu"), torch.rand(4)
    official_step = count_gflop(lambda: official_stepper(reference, cpu)(dist, ref, target))
    ahiq_step = count_gflop(lambda: ahiq_stepper(model, Runtime(), cpu)(dist, ref, target))
    print(f"flops_train_p8_batch4: reference {official_step / 4:.0f} GFLOP/pair, ahiq {ahiq_step / 4:.0f} "
          f"GFLOP/pair, ratio {official_step / ahiq_step:.2f}x", flush=True)


def variants() -> None:
    from ahiq.nn.model import AHIQ
    from ahiq.registry.variants import AHIQ as AHIQ_VARIANT, TABLES

    seen = {}
    for number, table in TABLES.items():
        for row in table.rows():
            seen.setdefault(row.slug, (number, row.variant))
    for name, (number, variant) in seen.items():
        options = {**AHIQ_VARIANT, **variant}
        torch.manual_seed(0)
        model = AHIQ(options.pop("patch_size"), False, False, **options).eval()
        reference_crop, distorted_crop = crop_gflop(model)
        weights = sum(p.numel() for p in model.parameters()) / 1e6
        trained = sum(p.numel() for k, p in model.named_parameters() if k.startswith(("fusion.", "head."))) / 1e6
        print(f"variant_{name} (table {number}): {distorted_crop:.1f} GFLOP per distorted crop, {reference_crop:.1f} "
              f"per reference crop; {weights:.1f}M weights, {trained:.1f}M trained", flush=True)


if __name__ == "__main__":
    args = arguments().parse_args()
    variants() if args.variants else pairs(args.crops, args.distortions)
