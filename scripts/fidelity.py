#!/usr/bin/env python
"""How far fp32 moves the fidelity numbers, across what one machine can vary: the known answers of
tests/test_known_answers.py (the official code's scores for the full-size model, patch 8 and 16, and its
three training-step losses, on generated weights and images) computed by ahiq and by the official compute
pattern (ahiq/nn/official.py) in one process, under each environment: timm's attention (TIMM_FUSED_ATTN 0, 1),
ATen's vector instructions (ATEN_CPU_CAPABILITY) with oneDNN's (ONEDNN_MAX_CPU_ISA), and the threads.

    python scripts/fidelity.py [--quick]

Each environment runs in a process of its own. Printed per environment: the largest difference of ahiq's
scores from the official code's (stored) and from the official pattern's (same process), and the relative
differences of each training loss from the stored ones and from the official pattern's; first, once, ahiq
in float64 (the exact values fp32 approximates) against the stored numbers. ``--quick``: two environments.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ISAS = {"default": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE"}  # ATen's capability -> oneDNN's ceiling


def environments(quick: bool) -> list[dict]:
    """Each attention path under each instruction set this CPU has (the best one last), then the threads."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from measure import cpu_flags

    flags = cpu_flags()
    isas = [aten for aten in ISAS if aten == "default" or {"avx2": "avx2", "avx512": "avx512f"}[aten] in flags]
    found = [{"TIMM_FUSED_ATTN": fused, "ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": ISAS[aten],
              "OMP_NUM_THREADS": "2"} for fused in ("1", "0") for aten in isas]
    found += [{**found[-1], "OMP_NUM_THREADS": threads} for threads in ("1", "4")]
    return [found[len(isas) - 1], found[-3]] if quick else found


def measure(dtype: str) -> dict:
    """This process's numbers (dtype: float32 or float64; the official pattern in float32 only)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "scripts"))
    import timm
    import torch

    import known_answers
    from ahiq import AHIQ
    from ahiq.engine.training import make_optimizer, train_step
    from ahiq.nn.official import OfficialAHIQ, OfficialFusion, OfficialHead
    from ahiq.options import DEFAULTS
    from ahiq.runtime.device import ResolvedRuntime
    from benchmark import official_stepper

    expected = json.loads((ROOT / "tests" / "data" / "official_known_answers.json").read_text())
    as_batch = lambda images: torch.stack([torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in images])  # noqa: E731
    out: dict = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for patch in (8, 16):
            seeds = expected["seeds"][f"patch{patch}"]
            states = {}
            for name, tag in (("vit", f"vit_base_patch{patch}_224"), ("resnet50", "resnet50")):
                states[name] = known_answers.fill_state_dict(timm.create_model(tag).state_dict(), seeds[name])
                torch.save(states[name], f"{tmp}/{name}.pth")
            sections = {"deform_net_model_state_dict": OfficialFusion(patch).state_dict(),
                        "regressor_model_state_dict": OfficialHead().state_dict()}
            sections = {k: known_answers.fill_state_dict(v, seeds[k]) for k, v in sections.items()}
            torch.save(sections, f"{tmp}/AHIQ_vit_p{patch}_generated.pth")
            model = AHIQ.from_pretrained(f"{tmp}/AHIQ_vit_p{patch}_generated.pth", patch_size=patch,
                                         vit_pretrained=f"{tmp}/vit.pth", cnn_pretrained=f"{tmp}/resnet50.pth")
            model = model.to(getattr(torch, dtype))
            images = expected["images"]
            pairs = known_answers.make_images(images["n"], images["size"], images["seed"])
            dist, ref = (as_batch([p[k] for p in pairs]).to(getattr(torch, dtype)) for k in (1, 0))
            with torch.no_grad():
                out[f"scores_p{patch}"] = model(dist, ref).tolist()
            official = None
            if dtype == "float32":
                vit, resnet = timm.create_model(f"vit_base_patch{patch}_224"), timm.create_model("resnet50")
                vit.load_state_dict(states["vit"])
                resnet.load_state_dict(states["resnet50"])
                fusion, head = OfficialFusion(patch), OfficialHead()
                fusion.load_state_dict(sections["deform_net_model_state_dict"])
                head.load_state_dict(sections["regressor_model_state_dict"])
                official = OfficialAHIQ(vit, resnet, patch, fusion, head)
                with torch.no_grad():
                    out[f"official_p{patch}"] = official(dist, ref).tolist()
            if patch != expected["train"]["patch_size"]:
                continue
            batches = known_answers.make_images(6, seed=19)
            optimizer, scheduler = make_optimizer(model.train(), DEFAULTS["train"])
            step_official = official_stepper(official, torch.device("cpu")) if official is not None else None
            out["losses"], out["official_losses"] = [], []
            for i in range(expected["train"]["steps"]):
                batch = batches[2 * i:2 * i + 2]
                d, r = (as_batch([p[k] for p in batch]).to(getattr(torch, dtype)) for k in (1, 0))
                target = torch.tensor([0.3 + 0.2 * i, 0.8 - 0.1 * i], dtype=getattr(torch, dtype))
                out["losses"].append(train_step(model, optimizer, scheduler, d, r, target,
                                                ResolvedRuntime(torch.device("cpu"), False, "fp32")))
                if step_official is not None:
                    out["official_losses"].append(step_official(d, r, target))
    return out


def child(environment: dict, dtype: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", dtype], env={**os.environ, **environment},
                          capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two environments")
    parser.add_argument("--child", choices=("float32", "float64"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    from measure import machine

    stored = json.loads((ROOT / "tests" / "data" / "official_known_answers.json").read_text())
    losses = stored["train"]["losses"]

    def differences(numbers: dict, official_process: bool) -> str:
        scores = max(abs(a - b) for p in (8, 16) for a, b in zip(numbers[f"scores_p{p}"], stored["scores"][f"patch{p}"]))
        relative = [abs(a - b) / b for a, b in zip(numbers["losses"], losses)]
        text = f"scores {scores:.1e}, losses " + " ".join(f"{r:.1e}" for r in relative)
        if official_process:
            exact_scores = max(abs(a - b) for p in (8, 16) for a, b in zip(numbers[f"scores_p{p}"], exact[f"scores_p{p}"]))
            from_exact = [abs(a - b) / b for a, b in zip(numbers["losses"], exact["losses"])]
            text += f"; from float64 ahiq: scores {exact_scores:.1e}, losses " + " ".join(f"{r:.1e}" for r in from_exact)
        if official_process:
            same = max(abs(a - b) for p in (8, 16) for a, b in zip(numbers[f"scores_p{p}"], numbers[f"official_p{p}"]))
            pattern = [abs(a - b) / b for a, b in zip(numbers["losses"], numbers["official_losses"])]
            of_pattern = [abs(a - b) / b for a, b in zip(numbers["official_losses"], losses)]
            text += (f"; against the official pattern here: scores {same:.1e}, losses "
                     + " ".join(f"{r:.1e}" for r in pattern)
                     + "; the official pattern against the stored: losses " + " ".join(f"{r:.1e}" for r in of_pattern))
        return text

    print(f"# {machine()}", flush=True)
    exact = child({}, "float64")
    print(f"float64 ahiq against the official code's (stored): {differences(exact, False)}", flush=True)
    for environment in environments(args.quick):
        label = ", ".join(f"{k}={v}" for k, v in environment.items())
        start = time.perf_counter()
        text = differences(child(environment, "float32"), True)
        print(f"{label} ({time.perf_counter() - start:.0f} s): ahiq against the official code's: {text}", flush=True)


if __name__ == "__main__":
    main()
