#!/usr/bin/env python
"""ahiq's PyTorch scorer against its ONNX export on onnxruntime (the torch-free path), side by side in one run, on
the CPU: the PIPAL-shaped and LIVE-sized cases of scripts/benchmark.py, scored from the files as ``python -m ahiq
score`` does; then one distorted crop through the exported score graph under onnxruntime's settings (intra-op
threads, graph optimisation level, memory arena).

    python scripts/onnx_speed.py [--precision fp32 bf16] [--distortions 4] [--crops 5]
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path
from typing import Sequence


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="the PyTorch scorer's precisions (default: both)")
    parser.add_argument("--distortions", type=int, default=4, help="distorted images per reference (default 4)")
    parser.add_argument("--crops", type=int, default=5, help="random crops per pair (default 5)")
    return parser


if __name__ == "__main__":
    arguments().parse_args()  # --help and mistyped arguments answer before torch loads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ahiq.runtime.threads import prepare_environment  # noqa: E402

prepare_environment()  # the command lines' OpenMP waits, before torch loads
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ahiq.nn.official import random_official_setup  # noqa: E402
from ahiq.runtime.device import Runtime  # noqa: E402
from measure import PeakMemory, best_time, machine, timed, write_noisy_pairs  # noqa: E402


def onnx_suite(distortions: int, crops: int, precisions: Sequence[str]) -> list[dict]:
    """The eval suite's two cases, full-size ViT-B/8 with random weights, scored from the files as ``python -m
    ahiq score`` does: ahiq's PyTorch Scorer in each of ``precisions`` against the ONNX export on onnxruntime
    (OnnxScorer). Rows ``<case>_onnx``: pairs/s of each, the largest score difference from PyTorch fp32, and
    the peak memory of each from before its model is loaded (weights included: the ONNX export's two graphs
    each hold the backbones). Then onnxruntime's settings on one distorted crop through the score graph."""
    import onnxruntime

    from ahiq.data import Pair, Pairs
    from ahiq.scoring.export import export
    from ahiq.scoring.onnx_scorer import OnnxScorer
    from ahiq.scoring.scorer import Scorer

    cpu, rows = torch.device("cpu"), []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        _, model, checkpoint = random_official_setup(8, tmp)
        weights = {"vit_pretrained": Path(tmp) / "vit.pth", "cnn_pretrained": Path(tmp) / "resnet.pth"}
        make = {name: (lambda p=name: Scorer(checkpoint, crops="random", num_crops=crops, runtime=Runtime(precision=p),
                                             **weights)) for name in precisions}
        make["onnx"] = lambda: OnnxScorer(Path(tmp) / "onnx")
        first = make[precisions[0]]()
        export(first.ensemble.models, Path(tmp) / "onnx", first.ensemble.plan)
        first = None
        rng = np.random.default_rng(0)
        for case, (h, w, n_refs, per_ref) in {f"pipal_288_{crops}crop": (288, 288, 2, distortions),
                                              f"live_768x512_{crops}crop": (512, 768, 1, 1)}.items():
            written = write_noisy_pairs(Path(tmp), f"{case}_", h, w, n_refs, per_ref, rng)
            pairs = Pairs([Pair(str(ref), str(dist), float("nan"), dist.name) for ref, dist, _ in written])
            results, seconds, memory = {}, {}, {}
            for name, build in make.items():
                memory[name] = PeakMemory(cpu)
                with torch.no_grad(), memory[name]:  # loading, and the first run's work, count in the peak, not the time
                    scorer = build()
                    scorer.batch_size = per_ref
                    scorer.score_pairs(Pairs(list(pairs)[:1]))
                    results[name], seconds[name] = timed(lambda: scorer.score_pairs(pairs), cpu)
                scorer = None  # freed before the next path's peak is measured
                gc.collect()
            n = len(pairs)
            row = {"case": f"{case}_onnx", **{f"{k}_pairs_per_s": n / t for k, t in seconds.items()},
                   "onnx_max_diff_vs_fp32": float(np.abs(results["onnx"] - results["fp32"]).max()),
                   **{f"peak_{k}_mib": m.mib for k, m in memory.items()}}
            rows.append(row)
            others = ", ".join(f"ahiq {k} {n / seconds[k]:.3f} pairs/s" for k in precisions if k != "fp32")
            print(f"{case}_onnx: ahiq fp32 {n / seconds['fp32']:.3f} pairs/s, onnxruntime {n / seconds['onnx']:.3f} "
                  f"pairs/s ({seconds['fp32'] / seconds['onnx']:.2f}x ahiq fp32){', ' + others if others else ''}, "
                  f"max |diff| onnxruntime vs ahiq fp32 {row['onnx_max_diff_vs_fp32']:.2e}, peak memory with the "
                  f"weights " + ", ".join(f"{k} {m.mib:.0f} MiB" for k, m in memory.items()), flush=True)
        graph = str(Path(tmp) / "onnx" / "model0_score.onnx")
        crop = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
        with torch.no_grad():
            features = model.reference_features(torch.from_numpy(crop))
        feed = {"dist": crop, "reduced": features.reduced.numpy(), "offset": features.offset.numpy()}
        levels = onnxruntime.GraphOptimizationLevel
        threads = OnnxScorer(Path(tmp) / "onnx").threads
        for count, level, arena in ((threads, "ORT_ENABLE_ALL", True), (threads, "ORT_ENABLE_EXTENDED", True),
                                    (threads, "ORT_ENABLE_BASIC", True), (1, "ORT_ENABLE_ALL", True),
                                    (threads, "ORT_ENABLE_ALL", False)):
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.graph_optimization_level = count, getattr(levels, level)
            options.enable_cpu_mem_arena = arena
            session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
            took = best_time(lambda: session.run(None, feed), 3, cpu)
            name = f"onnx_settings_{count}threads_{level}{'' if arena else '_no_arena'}"
            print(f"{name}: {took:.3f} s per distorted crop", flush=True)
            rows.append({"case": name, "seconds_per_crop": took})
    return rows


if __name__ == "__main__":
    args = arguments().parse_args()
    print(f"# {machine()}; {torch.get_num_threads()} CPU threads", flush=True)
    onnx_suite(args.distortions, args.crops, ["fp32", *(p for p in args.precision if p != "fp32")])
