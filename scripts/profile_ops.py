#!/usr/bin/env python
"""Where evaluation's time goes, operator by operator, in fp32 and in bf16: the PIPAL-shaped case of
scripts/benchmark.py (ViT-B/8, random weights, 2 references x ``--distortions`` distorted 288x288 images,
``--crops`` random crops) through ahiq.scoring.inference.predict, under torch.profiler.

    python scripts/profile_ops.py [--precisions fp32 bf16] [--top 15]

Prints, for each precision, the wall time and the operators with the most self CPU time (their share, the
calls). ``ONEDNN_VERBOSE=1`` in the environment adds oneDNN's own line for every kernel it runs (which
implementation it chose: ``avx512_core_bf16``, ``avx512_core_amx``, ``jit:avx2`` ...).
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--distortions", type=int, default=2)
    parser.add_argument("--crops", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="operators shown per precision")
    return parser


def main() -> None:
    args = arguments().parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "scripts"))
    from ahiq.runtime.threads import prepare_environment

    prepare_environment()
    import time

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ahiq.data import CropPlan, Pair, Pairs
    from ahiq.nn.official import random_official_setup
    from ahiq.runtime.device import Runtime
    from ahiq.scoring.ensemble import Ensemble
    from ahiq.scoring.inference import predict
    from measure import machine, write_noisy_pairs

    print(f"# {machine()}; {torch.get_num_threads()} threads", flush=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        _, model, _ = random_official_setup(8, tmp)
        written = write_noisy_pairs(Path(tmp), "", 288, 288, 2, args.distortions, np.random.default_rng(0))
        pairs = [Pair(str(ref), str(dist), float("nan"), f"{i // args.distortions}_{i % args.distortions}")
                 for i, (ref, dist, _) in enumerate(written)]
        pairs, plan = Pairs(pairs), CropPlan(224, "random", args.crops)
        for precision in args.precisions:
            ensemble = Ensemble.prepared([copy.deepcopy(model)], plan, Runtime(precision=precision), torch.device("cpu"))
            run = lambda: predict(ensemble, pairs, batch_size=args.distortions)  # noqa: E731
            run()  # warm-up: oneDNN creates its kernels on first use
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                run()
                seconds = time.perf_counter() - start
            events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
            total = sum(e.self_cpu_time_total for e in events)
            print(f"\n## {precision}: {seconds:.2f} s for {len(pairs)} pairs ({len(pairs) / seconds:.3f} pairs/s)")
            print("| operator | self CPU s | share | calls |\n|---|---|---|---|")
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
                print(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {e.self_cpu_time_total / total:.0%} | {e.count} |")


if __name__ == "__main__":
    main()
