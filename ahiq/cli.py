"""Command-line entry points: options from --opt and key.path=value overrides, and errors printed as one
readable line instead of a traceback (--debug shows it)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from .messages import for_the_user
from .options import OptionsError, load_options
from .signals import Stopped
from .threads import applied, prepare_environment
from .zoo import DownloadError, VerificationError

TRAIN = "Train AHIQ: python train.py --opt options/pipal.yaml [key.path=value ...]"
TEST = ("Test AHIQ checkpoints, or write an NTIRE 2022 submission: python test.py --opt options/pipal.yaml "
        "[key.path=value ...]. Without --opt: options/pipal.yaml, testing its experiment's best checkpoint, or the "
        "released model before one exists.")


def expected_errors() -> tuple[type, ...]:
    """The errors a user can act on, printed as one line (imported here: they bring torch)."""
    from .data import DatasetError, ImageError
    from .weights import CheckpointWriteError, WeightsError

    return (OptionsError, DatasetError, ImageError, WeightsError, FileNotFoundError, ValueError, FloatingPointError,
            CheckpointWriteError, MemoryError, DownloadError, VerificationError)


def train_command(argv: list[str] | None = None) -> int:
    """python train.py"""
    prepare_environment()  # before torch is loaded: OpenMP reads its settings once
    from .training import train

    return run(TRAIN, train, argv)


def test_command(argv: list[str] | None = None) -> int:
    """python test.py"""
    prepare_environment()
    from .evaluation import run_default_test, run_test

    default = (Path(__file__).resolve().parents[1] / "options" / "pipal.yaml", run_default_test)
    return run(TEST, run_test, argv, default=default)


def run(description: str, action: Callable[[dict], object], argv: list[str] | None = None,
        default: tuple[Path, Callable[[dict], object]] | None = None) -> int:
    """Parse ``--opt`` and the overrides, run ``action`` on the options, print expected errors in one line.
    ``default``: (option file, action) for a command line without ``--opt``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--opt", required=default is None, type=Path,
                        help="YAML option file, e.g. options/pipal.yaml" + (f" (default {default[0]})" if default else ""))
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override any option, e.g. train.epochs=10 name=try2 (values parsed as YAML)")
    parser.add_argument("--weights", metavar="DIR", help="a weights folder (python -m ahiq download --dir DIR): "
                        "every weight file from there, no network; the same as model.weights=DIR")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    if args.weights is not None:
        args.overrides.append(f"model.weights={args.weights}")
    if args.opt is None:
        args.opt, action = default
    try:
        options = load_options(args.opt, args.overrides)
        with applied(options["runtime"]["threads"]):
            action(options)
    except expected_errors() as exc:
        if args.debug:
            raise
        print(f"error: {for_the_user(exc)}", file=sys.stderr)
        return 2
    except Stopped as exc:
        if not exc.logged:
            print(exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted at once (a second signal); continue a training run with train.resume=auto",
              file=sys.stderr)
        return 130
    return 0
