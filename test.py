#!/usr/bin/env python
"""Test AHIQ checkpoints, or write an NTIRE 2022 submission: python test.py --opt options/pipal.yaml [key.path=value ...]"""
import sys

from ahiq.cli import run
from ahiq.evaluation import run_test

if __name__ == "__main__":
    sys.exit(run(__doc__, run_test))
