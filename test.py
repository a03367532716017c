#!/usr/bin/env python
"""AHIQ testing: `python test.py --opt options/<experiment>.yaml`. Not written yet (the training issue)."""
import sys

if __name__ == "__main__":
    sys.exit("test.py is not implemented yet: option files, datasets and the testing loop are still to come. "
             "The model itself is ready: see the README, 'Using the model'.")
