#!/usr/bin/env python
"""Train AHIQ: python train.py --opt options/pipal.yaml [key.path=value ...]"""
import sys

from ahiq.cli import run
from ahiq.training import train

if __name__ == "__main__":
    sys.exit(run(__doc__, train))
