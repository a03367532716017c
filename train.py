#!/usr/bin/env python
"""Train AHIQ: python train.py --opt options/pipal.yaml [key.path=value ...]"""
import sys

from ahiq.cli import train_command

if __name__ == "__main__":
    sys.exit(train_command())
