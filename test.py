#!/usr/bin/env python
"""Test AHIQ checkpoints, or write an NTIRE 2022 submission: python test.py --opt options/pipal.yaml [key.path=value ...].
Without --opt: options/pipal.yaml, testing its experiment's best checkpoint, or the released model before one exists."""
import sys
from pathlib import Path

from ahiq.cli import run
from ahiq.evaluation import run_default_test, run_test

if __name__ == "__main__":
    sys.exit(run(__doc__, run_test, default=(Path(__file__).resolve().parent / "options" / "pipal.yaml", run_default_test)))
