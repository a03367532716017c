#!/usr/bin/env python
"""The torch-free install, for real: a fresh virtual environment with this checkout installed without its
dependencies and the ONNX scorer's packages only (TORCH_FREE, as the README's command installs them), its
size, and a score from it checked against the one given.

    python scripts/torch_free_install.py --onnx exports/demo --dist a.png --ref b.png [--expect 0.338168] [--venv DIR]

Downloads the packages (PyPI); prints the environment's size in MB, the pip command, whether torch is
importable there (it must not be), and the score. Exits 1 when the score differs from --expect by more than
1e-5 or torch is there.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What `python -m ahiq score --onnx` imports besides the standard library (the README's torch-free command).
TORCH_FREE = ["numpy", "opencv-python-headless", "onnxruntime>=1.25", "pyyaml", "tqdm"]


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, type=Path, help="an export folder (python -m ahiq export --out)")
    parser.add_argument("--dist", required=True, type=Path)
    parser.add_argument("--ref", required=True, type=Path)
    parser.add_argument("--expect", type=float, help="the score PyTorch gives this pair")
    parser.add_argument("--venv", type=Path, help="where to make the environment (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        venv = args.venv or Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        python = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
        quiet = ["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([python, *quiet, "--no-deps", str(ROOT)], check=True)
        subprocess.run([python, *quiet, *TORCH_FREE], check=True)
        torch_there = subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0
        done = subprocess.run([python, "-m", "ahiq", "score", "--onnx", str(args.onnx.resolve()), "--dist",
                               str(args.dist.resolve()), "--ref", str(args.ref.resolve())], capture_output=True,
                              text=True, cwd=tmp)
        print(f"environment: {size_mb(venv):.0f} MB ({venv}); pip install --no-deps . && pip install "
              f"{' '.join(TORCH_FREE)}")
        print(f"torch importable there: {torch_there}")
        print(done.stderr.strip().splitlines()[0] if done.stderr.strip() else "", file=sys.stderr)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return 1
        score = float(done.stdout.strip().rsplit(",", 1)[1])
        print(f"score: {score:.6f}" + (f" (expected {args.expect:.6f})" if args.expect is not None else ""))
        return int(torch_there or (args.expect is not None and abs(score - args.expect) > 1e-5))


if __name__ == "__main__":
    sys.exit(main())
