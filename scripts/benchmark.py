#!/usr/bin/env python
"""AHIQ against the official compute pattern, side by side in one run on the same inputs and weights.

    python scripts/benchmark.py --suite model --device cpu

    python scripts/benchmark.py --suite eval --device cpu [--distortions 16 --crops 20]

Suite ``model``: one 224x224 pair through the whole network, ViT-B/8 and ViT-B/16, random weights (speed and
agreement do not depend on trained values). Suite ``eval``: crop-ensemble evaluation, ViT-B/8, of a
PIPAL-shaped set (288x288 images, ``--distortions`` distorted images for each of 2 references) and of single
768x512 pairs (LIVE's size), ``--crops`` random 224 crops per pair; ahiq runs ``ahiq.engine.predict`` end
to end from image files (decoding included), the reference gets the same crops as in-memory tensors. The
reference is ahiq.reference.OfficialAHIQ: full ViT and ResNet50 forwards with hooks on every block, the
fusion run once per image, torchvision's deformable convolution, and (eval) the official test loop: one
forward per crop index over a batch of pairs. Each case prints
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


def eval_suite(device: torch.device, distortions: int, crops: int) -> None:
    """Crop-ensemble evaluation: the official per-crop loop against ahiq's grouped prediction."""
    import cv2
    import numpy as np

    from ahiq.data import EvalPairs, Pair, Pairs
    from ahiq.engine import Part, predict

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        reference, model, _ = random_official_setup(8, tmp)
        reference, model = reference.to(device), model.to(device)
        rng = np.random.default_rng(0)
        cases = {"pipal_288_20crop" if crops == 20 else f"pipal_288_{crops}crop": (288, 288, 2, distortions),
                 "live_768x512_20crop" if crops == 20 else f"live_768x512_{crops}crop": (512, 768, 1, 1)}
        for case, (h, w, n_refs, per_ref) in cases.items():
            pairs = []
            for r in range(n_refs):  # smooth random images: compression and decoding behave as for photos
                ref = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.uint8), (0, 0), 2)
                cv2.imwrite(f"{tmp}/{case}_R{r}.png", ref)
                for d in range(per_ref):
                    noisy = np.clip(ref + rng.normal(0, 4 + 3 * d, ref.shape), 0, 255).astype(np.uint8)
                    cv2.imwrite(f"{tmp}/{case}_R{r}_{d}.png", noisy)
                    pairs.append(Pair(f"{tmp}/{case}_R{r}.png", f"{tmp}/{case}_R{r}_{d}.png", float("nan"), f"{r}_{d}"))
            part = Part(Pairs(pairs), None)
            items = EvalPairs(part.pairs, 224, "random", crops, check=False)

            def official():
                out = []
                for r in range(n_refs):  # a batch of the pairs of one reference, one forward per crop index
                    group = [items[i] for i in range(r * per_ref, (r + 1) * per_ref)]
                    dist = torch.stack([g[0] for g in group]).to(device)
                    ref = torch.stack([g[1] for g in group]).to(device)
                    out.append(sum(reference(dist[:, k], ref[:, k]) for k in range(crops)) / crops)
                return torch.cat(out)

            with torch.no_grad():
                start = time.perf_counter()
                expected = official()
                t_ref = time.perf_counter() - start
                start = time.perf_counter()
                got = predict([model], part, 224, "random", crops, batch_size=per_ref, device=device)
                t_ours = time.perf_counter() - start
            diff = float(np.abs(got - expected.double().cpu().numpy()).max())
            n = len(pairs)
            print(f"{case}: reference {n / t_ref:.3f} pairs/s, ahiq {n / t_ours:.3f} pairs/s, "
                  f"speedup {t_ref / t_ours:.2f}x, max |diff| {diff:.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["model", "eval", "all"], default="all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="model suite: timed calls per path; the fastest counts")
    parser.add_argument("--distortions", type=int, default=None,
                        help="eval suite: distorted images per reference (default 16 on CUDA, 4 on the CPU)")
    parser.add_argument("--crops", type=int, default=None, help="eval suite: random crops (default 20 on CUDA, 5 on the CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {device.type} ({name}), {torch.get_num_threads()} CPU threads", flush=True)
    if args.suite in ("model", "all"):
        model_suite(device, args.repeats)
    if args.suite in ("eval", "all"):
        cuda = device.type == "cuda"
        eval_suite(device, args.distortions or (16 if cuda else 4), args.crops or (20 if cuda else 5))


if __name__ == "__main__":
    main()
