#!/usr/bin/env python
"""Test AHIQ checkpoints, or write an NTIRE 2022 submission: python test.py --opt options/pipal.yaml [key.path=value ...].
Without --opt: options/pipal.yaml, testing its experiment's best checkpoint, or the released model before one exists."""
import sys

from ahiq.cli import test_command

if __name__ == "__main__":
    sys.exit(test_command())
