#!/usr/bin/env python
"""AHIQ against the official compute pattern, side by side in one run on the same inputs and weights, and
against the machine's own matmul.

    python scripts/benchmark.py --suite all --device cpu
    python scripts/benchmark.py --suite eval --device cuda [--distortions 16 --crops 20]
    python scripts/benchmark.py --suite train --device cuda

Suite ``model``: one 224x224 pair through the whole network, ViT-B/8 and ViT-B/16, random weights (speed and
agreement do not depend on trained values). Suite ``eval``: crop-ensemble evaluation, ViT-B/8, of a
PIPAL-shaped set (288x288 images, ``--distortions`` distorted images for each of 2 references) and of single
768x512 pairs (LIVE's size), ``--crops`` random 224 crops per pair; ahiq runs ``ahiq.scoring.inference.predict`` end
to end from image files (decoding included), the reference gets the same crops as in-memory tensors.
Suite ``train``: training steps of ViT-B/8 on random 224 crops at the paper's batch (4) and, on CUDA, at the
largest batch each path fits; ahiq runs ``ahiq.engine.training.train_step`` (frozen backbones without gradients), the
reference the official step (backbones in eval mode but inside autograd, as the official train.py runs
them). The reference is ahiq.nn.official.OfficialAHIQ: full ViT and ResNet50 forwards with hooks on every
block, the fusion run once per image, torchvision's deformable convolution, fp32, and (eval) the official
test loop: one forward per crop index over a batch of pairs; after each eval case a ``_metric`` row: the
metric (ahiq.create_metric) on the same pairs as tensors, against ahiq's prediction from the files.
``--precision bf16`` or ``all`` runs ahiq in bf16 too (rows ``<case>_bf16``, against the same official fp32
pattern), and ``all`` also with ``runtime.precision=auto`` (rows ``<case>_auto``: what auto chooses here, said in
the header); by default where the device computes bf16 natively (the header says whether the CPU does). Suite
``chunk``: one pair's 20 crops with ``--chunks`` crops per forward pass (what ``runtime.crop_chunk``'s default
rests on). Each case prints
    <case>: reference <a> pairs/s, ahiq <b> pairs/s, speedup <x>x, max |diff| <d> [(against ahiq fp32 <e>)], peak memory ...
max |diff| is every row's largest difference from the official pattern over the scores (model, eval), or
(train) over the losses of the same steps from the same weights on the same batches, relative (random
weights make the loss jump after the first step); a bf16 row also gives its difference from ahiq's fp32 row.
Peak memory: the CUDA allocator's peak, or on the CPU the growth of the resident set (Linux; freed memory
returned to the system first), both above what was allocated before the case.

The machine's own matmul at ViT-B/8's shapes (scripts/measure.py, MATMUL_SHAPES) is sampled before, between and
after the eval and train suites, in fp32 and in bf16; at the end, each of ahiq's rows of those suites with the
operations it performs per pair (counted, scripts/operations.py), the GFLOP/s it reaches, and that as a share of
the mean of the matmul samples in its precision ("of matmul"). The operation counts alone: scripts/operations.py;
the ONNX export beside PyTorch: scripts/onnx_speed.py.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
from pathlib import Path


SUITES = ("model", "eval", "train", "chunk")


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=SUITES + ("all",), default=["all"],
                        help="one or more suites (default: all of them)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where there is a GPU, else cpu")
    parser.add_argument("--repeats", type=int, default=3,
                        help="model: timed calls per path (the fastest counts); train: timed steps per path")
    parser.add_argument("--distortions", type=int, default=None,
                        help="eval suite: distorted images per reference (default 16 on CUDA, 4 on the CPU)")
    parser.add_argument("--crops", type=int, default=None, help="eval suite: random crops (default 20 on CUDA, 5 on the CPU)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[20, 10, 8, 5, 2],
                        help="chunk suite: the crops per forward pass to measure")
    parser.add_argument("--nchw", action="store_true", help="ahiq in the NCHW layout (runtime.channels_last=false)")
    parser.add_argument("--compile", action="store_true", help="ahiq: torch.compile (compile time in the warm-up)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto", "all"], default=None,
                        help="ahiq's precision(s); all: fp32, bf16 and auto (runtime.precision=auto: what it chooses "
                             "here, and why). Default: all where the device has native bf16, else fp32")
    return parser


if __name__ == "__main__":
    arguments().parse_args()  # --help and mistyped arguments answer before torch loads

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ahiq.runtime.threads import prepare_environment  # noqa: E402

prepare_environment()  # the command lines' OpenMP waits, before torch loads
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ahiq.options import DEFAULTS  # noqa: E402
from ahiq.nn.official import random_official_setup  # noqa: E402
from ahiq.runtime.device import Runtime, native_bf16, set_tf32  # noqa: E402
from ahiq.engine.training import make_optimizer, train_step  # noqa: E402
from ahiq.scoring.ensemble import Ensemble, resolve  # noqa: E402
from measure import (MatmulReference, PeakMemory, agreement, best_time, count_gflop, crop_gflop, environment,  # noqa: E402
                     machine, report, timed, write_noisy_pairs)


def model_suite(device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for patch_size in (8, 16):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            reference, model, _ = random_official_setup(patch_size, tmp)
        reference, model = reference.to(device), model.to(device)
        dist, ref = torch.rand(2, 1, 3, 224, 224, device=device)
        with torch.no_grad():
            diff = {"max_diff": (model(dist, ref) - reference(dist, ref)).abs().max().item()}
            with PeakMemory(device) as mem_ref:
                t_ref = best_time(lambda: reference(dist, ref), repeats, device)
            with PeakMemory(device) as mem_ours:
                t_ours = best_time(lambda: model(dist, ref), repeats, device)
        rows.append(report(f"pair224_p{patch_size}", 1, t_ref, 1, t_ours, diff, mem_ref, mem_ours))
    return rows


def eval_suite(device: torch.device, distortions: int, crops: int, runtimes: dict[str, Runtime],
               sizes: dict | None = None, rows: list | None = None) -> list[dict]:
    """Crop-ensemble evaluation: the official per-crop loop against ahiq's grouped prediction. ``sizes``:
    AHIQ's size arguments (the paper's by default); the images keep their shapes relative to the crop."""
    from scipy.stats import spearmanr

    from ahiq.data import CropPlan, EvalPairs, Pair, Pairs, Part
    from ahiq.scoring.inference import predict

    sizes = sizes or {}
    size = sizes.get("img_size", 224)
    scaled = lambda pixels: pixels * size // 224  # noqa: E731
    torch.manual_seed(0)
    rows = [] if rows is None else rows  # a caller's list sees each row as it is measured
    with tempfile.TemporaryDirectory() as tmp:
        reference, model, _ = random_official_setup(8, tmp, **sizes)
        checkpoint = Path(tmp) / "ahiq.pth"  # this project's format: it carries the sizes the metric needs
        model.save_checkpoint(checkpoint)
        reference = reference.to(device)
        # prepared for scoring as the scorers prepare them
        ensembles = {name: Ensemble.prepared([copy.deepcopy(model)], CropPlan(size, "random", crops), runtime, device)
                     for name, runtime in runtimes.items()}
        reference_gflop, distorted_gflop = crop_gflop(model)
        rng = np.random.default_rng(0)
        cases = {f"pipal_{scaled(288)}_{crops}crop": (scaled(288), scaled(288), 2, distortions),
                 f"live_{scaled(768)}x{scaled(512)}_{crops}crop": (scaled(512), scaled(768), 1, 1)}
        for case, (h, w, n_refs, per_ref) in cases.items():
            written = write_noisy_pairs(Path(tmp), f"{case}_", h, w, n_refs, per_ref, rng)
            pairs = [Pair(str(ref), str(dist), float("nan"), f"{i // per_ref}_{i % per_ref}")
                     for i, (ref, dist, _) in enumerate(written)]
            psnr = [value for _, _, value in written]
            part = Part(Pairs(pairs), None)
            plan = CropPlan(size, "random", crops)
            decoded = EvalPairs(part.pairs, plan, check=False)
            items = [[plan.cut(image, plan.windows(h, w, Path(pair.ref).name)) for image in decoded[i][:2]]
                     for i, pair in enumerate(pairs)]

            def official():
                out = []
                for r in range(n_refs):  # a batch of the pairs of one reference, one forward per crop index
                    group = [items[i] for i in range(r * per_ref, (r + 1) * per_ref)]
                    dist = torch.stack([g[0] for g in group]).to(device)
                    ref = torch.stack([g[1] for g in group]).to(device)
                    out.append(sum(reference(dist[:, k], ref[:, k]) for k in range(crops)) / crops)
                return torch.cat(out)

            def measured(fn, memory):
                with torch.no_grad(), memory:
                    return timed(fn, device)

            n = len(pairs)
            # Both paths warmed up untimed on one crop of one pair (CUDA handles, lazy kernel loading, the
            # cuBLAS workspace): otherwise whichever runs first pays for them.
            with torch.no_grad():
                reference(items[0][0][:1].to(device), items[0][1][:1].to(device))
                for ensemble in ensembles.values():
                    predict(Ensemble(ensemble.models, CropPlan(size, "random", 1), ensemble.runtime), Pairs(pairs[:1]))
            mem_ref = PeakMemory(device)
            expected, t_ref = measured(official, mem_ref)
            expected = expected.double().cpu().numpy()
            results = {}
            for name, ensemble in ensembles.items():
                def ours():
                    return predict(ensemble, part.pairs, batch_size=per_ref)

                if ensemble.runtime.compile:
                    measured(ours, PeakMemory(device))  # compiling is not timed
                mem_ours = PeakMemory(device)
                results[name], t_ours = measured(ours, mem_ours)
                # with more than a few pairs: whether the ranking against a label (here the PSNR) is the same
                extra = (f", SROCC vs PSNR reference {spearmanr(expected, psnr)[0]:.4f}, ahiq "
                         f"{spearmanr(results[name], psnr)[0]:.4f}" if n >= 8 else "")
                rows.append(report(f"{case}_{name}", n, t_ref, n, t_ours, agreement(results, expected, name), mem_ref,
                                   mem_ours, extra))
                rows[-1].update(precision="bf16" if ensemble.runtime.bf16 else "fp32",
                                ahiq_gflop_per_pair=crops * (distorted_gflop + reference_gflop / per_ref))
            rows.extend(metric_rows(case, checkpoint, runtimes, part, plan, device, results))
    return rows


def metric_rows(case: str, checkpoint: Path, runtimes: dict, part, plan, device: torch.device, results: dict) -> list[dict]:
    """The metric (ahiq.create_metric) on the same pairs as in-memory tensors, against the prediction from the
    files that the scorer and test.py make: the same scores from the same core, and its speed (no decoding)."""
    from ahiq.data import read_image
    from ahiq.data.datasets import to_tensor
    from ahiq.scoring.metric import create_metric

    rows = []
    for name, runtime in runtimes.items():
        metric = create_metric(checkpoint, crops=plan.mode, num_crops=plan.count, device=device, runtime=runtime,
                               vit_pretrained=checkpoint.parent / "vit.pth", cnn_pretrained=checkpoint.parent / "resnet.pth")
        dists = [to_tensor(read_image(p.dist)) for p in part.pairs]
        refs = [to_tensor(read_image(p.ref)) for p in part.pairs]
        names = [Path(p.ref).name for p in part.pairs]

        def run():
            return metric(dists, refs, ref_names=names).double().cpu().numpy()

        with torch.no_grad():
            if runtime.compile:
                run()  # compiling is not timed, as in the prediction's rows
            with PeakMemory(device) as memory:
                got, seconds = timed(run, device)
        rows.append({"case": f"{case}_{name}_metric", "metric_pairs_per_s": len(dists) / seconds,
                     "max_diff_vs_scorer": float(np.abs(got - results[name]).max()), "peak_metric_mib": memory.mib})
        print(f"{case}_{name}_metric: metric {len(dists) / seconds:.3f} pairs/s, max |diff| against the scorer "
              f"{rows[-1]['max_diff_vs_scorer']:.2e}, peak memory {memory.mib:.0f} MiB", flush=True)
    return rows


def chunk_suite(device: torch.device, sizes: list[int], runtimes: dict[str, Runtime]) -> None:
    """One PIPAL-sized pair's 20 crops, ViT-B/8, with ``runtime.crop_chunk`` crops per forward pass, in each
    runtime: what the default (runtime.crop_chunk null) rests on."""
    from dataclasses import replace

    from ahiq.data import CropPlan

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        _, model, _ = random_official_setup(8, tmp)
    ref, dist = torch.rand(2, 3, 288, 288)
    plan = CropPlan(224, "random", 20)
    for name, runtime in runtimes.items():
        for size in sizes:
            ensemble = Ensemble.prepared([copy.deepcopy(model)], plan, replace(runtime, crop_chunk=size), device)

            def run():
                return ensemble.score_group(ref, [dist], "r.png").scores

            with torch.no_grad():
                run()
                with PeakMemory(device) as memory:
                    seconds = best_time(run, 2, device)
            print(f"chunk_{size}_{name}: {seconds:.2f} s per pair of 20 crops, peak memory {memory.mib:.0f} MiB",
                  flush=True)
        with torch.no_grad():  # as evaluation asks (under autograd a crop counts three times)
            print(f"# {name}: the default here, {resolve(runtime, device, [model]).crops()} crops per pass", flush=True)


def official_stepper(reference: torch.nn.Module, device: torch.device):
    """The official training step (the default recipe) on a copy of ``reference``: step(dist, ref, target) -> loss."""
    recipe = DEFAULTS["train"]
    net = copy.deepcopy(reference).to(device)
    net.fusion.train(), net.head.train()  # the backbones stay in eval mode, inside autograd
    optimizer = torch.optim.Adam([
        {"params": net.head.parameters(), "lr": recipe["lr"], "weight_decay": recipe["weight_decay"]},
        {"params": net.fusion.parameters(), "lr": recipe["lr"], "weight_decay": recipe["weight_decay"]}])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe["t_max"], recipe["eta_min"])

    def step(dist, ref, target):
        loss = torch.nn.functional.mse_loss(net(dist, ref).squeeze(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.item()
    return step


def ahiq_stepper(model: torch.nn.Module, runtime: Runtime, device: torch.device):
    """ahiq.engine.training.train_step (the default recipe) on a copy of ``model``, prepared as train.py prepares it:
    step(dist, ref, target) -> loss."""
    run = resolve(runtime, device, [model])
    net = run.prepare(copy.deepcopy(model)).train()
    optimizer, scheduler = make_optimizer(net, DEFAULTS["train"])
    stepper = run.compiled(net)
    return lambda dist, ref, target: train_step(stepper, optimizer, scheduler, run.inputs(dist), run.inputs(ref),
                                                target, run)


def train_suite(device: torch.device, repeats: int, runtimes: dict[str, Runtime], sizes: dict | None = None,
                largest: bool = True, rows: list | None = None) -> list[dict]:
    """Training steps of ViT-B/8: the official step against ahiq.engine.training.train_step, from the same weights
    (``sizes``: AHIQ's size arguments; ``largest``: on CUDA also the largest batch each path fits)."""
    sizes = sizes or {}
    size = sizes.get("img_size", 224)
    torch.manual_seed(0)
    rows = [] if rows is None else rows  # a caller's list sees each row as it is measured
    with tempfile.TemporaryDirectory() as tmp:
        reference, model, _ = random_official_setup(8, tmp, **sizes)

    def run(stepper, batches):
        """Losses of all steps and the seconds of all but the first (the warm-up)."""
        with PeakMemory(device) as memory:
            first = stepper(*batches[0])
            rest, seconds = timed(lambda: [stepper(*batch) for batch in batches[1:]], device)
        return [first, *rest], seconds, memory

    def batches(batch, count):
        g = torch.Generator().manual_seed(batch)
        return [(torch.rand(batch, 3, size, size, generator=g).to(device),
                 torch.rand(batch, 3, size, size, generator=g).to(device), torch.rand(batch, generator=g).to(device))
                for _ in range(count)]

    data = batches(4, repeats + 1)
    step_gflop = count_gflop(lambda: ahiq_stepper(model, Runtime(), torch.device("cpu"))(*batches(4, 1)[0]))
    ref_losses, t_ref, mem_ref = run(official_stepper(reference, device), data)
    losses = {}
    for name, runtime in runtimes.items():
        losses[name], t_ours, mem_ours = run(ahiq_stepper(model, runtime, device), data)
        relative = {row: np.array([(b - a) / abs(a) for a, b in zip(ref_losses, values)]) for row, values in losses.items()}
        rows.append(report(f"train_p8_batch4_{name}", 4 * repeats, t_ref, 4 * repeats, t_ours,
                           agreement(relative, 0.0, name), mem_ref, mem_ours, what="max relative |diff| of the losses"))
        rows[-1].update(precision="bf16" if resolve(runtime, device, [model]).bf16 else "fp32",
                        ahiq_gflop_per_pair=step_gflop / 4)
    if device.type != "cuda" or not largest:
        print("# train, largest batch: CUDA only (the CPU has no fixed memory limit)", flush=True)
        return rows
    for name, runtime in runtimes.items():
        found = {}
        for label, make in (("reference", lambda: official_stepper(reference, device)),
                            ("ahiq", lambda: ahiq_stepper(model, runtime, device))):
            batch = 4
            while batch <= 512:  # doubling until the device runs out of memory
                try:
                    _, seconds, memory = run(make(), batches(batch * 2, 3))
                    batch *= 2
                    found[label] = (batch, seconds, memory)
                except torch.OutOfMemoryError:
                    break
                finally:
                    gc.collect()
                    torch.cuda.empty_cache()
        if len(found) == 2:
            (b_ref, t_ref, m_ref), (b_ours, t_ours, m_ours) = found["reference"], found["ahiq"]
            rows.append(report(f"train_p8_largest_{name}", 2 * b_ref, t_ref, 2 * b_ours, t_ours, {}, m_ref, m_ours,
                               f", batch reference {b_ref}, ahiq {b_ours}"))
    return rows


def of_matmul(rows: list[dict], matmul: MatmulReference) -> None:
    """Each ahiq row of the eval and train suites beside the machine's matmul: the operations it performs per pair,
    the GFLOP/s that is at its speed, and the share of the matmul's GFLOP/s (the mean of the run's samples in the
    row's precision)."""
    print("# ahiq beside the machine's matmul (samples' mean): " + ", ".join(
        f"{k} {matmul.rate(k):.0f} GFLOP/s" for k in matmul.samples), flush=True)
    for row in rows:
        if "ahiq_gflop_per_pair" in row and row["precision"] in matmul.samples:
            rate = row["ahiq_pairs_per_s"] * row["ahiq_gflop_per_pair"]
            row.update(ahiq_gflops=rate, of_matmul=rate / matmul.rate(row["precision"]))
            print(f"{row['case']}: {row['ahiq_pairs_per_s']:.3f} pairs/s x {row['ahiq_gflop_per_pair']:.0f} GFLOP/pair = "
                  f"{rate:.0f} GFLOP/s = {row['of_matmul']:.0%} of {row['precision']} matmul", flush=True)


def main() -> None:
    args = arguments().parse_args()
    suites = set(SUITES if "all" in args.suite else args.suite)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda":
        set_tf32(False)  # every suite in strict fp32, the model suite (which uses no Runtime) included
    env = environment(device)
    print(f"# {machine()}; {env['threads']} CPU threads" + (f"; {env['gpu']}, bf16 {env['bf16']}" if env.get("gpu") else ""),
          flush=True)
    precisions = {"fp32": ("fp32",), "bf16": ("bf16",), "auto": ("auto",), "all": ("fp32", "bf16", "auto")}[
        args.precision or ("all" if native_bf16(device) else "fp32")]
    runtimes = {p: Runtime(precision=p, channels_last=not args.nchw, compile=args.compile) for p in precisions}
    if "auto" in runtimes:
        from ahiq.nn.model import AHIQ

        chosen = resolve(runtimes["auto"], device, [AHIQ(8, False, False)])
        print(f"# runtime.precision=auto here: {chosen.describe().split(';')[0]}", flush=True)
    if "model" in suites:
        model_suite(device, args.repeats)
    rows, matmul = [], MatmulReference(device, native_bf16(device))
    if suites & {"eval", "train"}:
        matmul.sample("before")
    if "eval" in suites:
        cuda = device.type == "cuda"
        eval_suite(device, args.distortions or (16 if cuda else 4), args.crops or (20 if cuda else 5), runtimes,
                   rows=rows)
    if {"eval", "train"} <= suites:
        matmul.sample("between")
    if "train" in suites:
        train_suite(device, args.repeats, runtimes, rows=rows)
    if suites & {"eval", "train"}:
        matmul.sample("after")
        of_matmul(rows, matmul)
    if "chunk" in suites:
        chunk_suite(device, args.chunks, runtimes)


if __name__ == "__main__":
    main()
