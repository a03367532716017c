#!/usr/bin/env python
"""AHIQ against the official compute pattern, side by side in one run on the same inputs and weights.

    python scripts/benchmark.py --suite model --device cpu

Suite ``model``: one 224x224 pair through the whole network, ViT-B/8 and ViT-B/16, random weights (speed and
agreement do not depend on trained values). The reference is ahiq.reference.OfficialAHIQ: full ViT and
ResNet50 forwards with hooks on every block, the fusion run once per image, torchvision's deformable
convolution. Each case prints
    <case>: reference <a> pairs/s, ahiq <b> pairs/s, speedup <x>x, max |diff| <d>
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ahiq.reference import random_official_setup  # noqa: E402


def best_time(fn, repeats: int, device: torch.device) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def model_suite(device: torch.device, repeats: int) -> None:
    for patch_size in (8, 16):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            reference, model, _ = random_official_setup(patch_size, tmp)
        reference, model = reference.to(device), model.to(device)
        dist, ref = torch.rand(2, 1, 3, 224, 224, device=device)
        with torch.no_grad():
            diff = (model(dist, ref) - reference(dist, ref)).abs().max().item()
            t_ref = best_time(lambda: reference(dist, ref), repeats, device)
            t_ours = best_time(lambda: model(dist, ref), repeats, device)
        print(f"pair224_p{patch_size}: reference {1 / t_ref:.3f} pairs/s, ahiq {1 / t_ours:.3f} pairs/s, "
              f"speedup {t_ref / t_ours:.2f}x, max |diff| {diff:.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["model"], default="model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path; the fastest counts")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {device.type} ({name}), {torch.get_num_threads()} CPU threads", flush=True)
    model_suite(device, args.repeats)


if __name__ == "__main__":
    main()
