"""The command lines: train.py and test.py (options from --opt and key.path=value overrides) and
``python -m ahiq score / download / zoo / launch`` (also the installed ``ahiq`` command). Errors a user can
act on are printed as one line instead of a traceback (--debug shows it). Nothing here imports torch before
a command needs it, so that --help, zoo and download answer at once."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

from ahiq.messages import for_the_user
from ahiq.nn.downloads import DownloadError, VerificationError, download
from ahiq.nn.zoo import BACKBONES, ZOO, cache_dirs, find, weights_folder
from ahiq.options import EVAL_CROPS, PRECISIONS, SCHEMA, OptionsError, load_options, plain_text
from ahiq.runtime.signals import Stopped
from ahiq.runtime.threads import applied, prepare_environment

TRAIN = "Train AHIQ: python train.py --opt options/pipal.yaml [key.path=value ...]"
TEST = ("Test AHIQ checkpoints, or write an NTIRE 2022 submission: python test.py --opt options/pipal.yaml "
        "[key.path=value ...]. Without --opt: options/pipal.yaml, testing its experiment's best checkpoint, or the "
        "released model before one exists.")


def expected(exc: BaseException) -> bool:
    """An error the user can act on, printed as one line; those that bring torch are imported only for an
    error that is none of the others."""
    if isinstance(exc, (OptionsError, FileNotFoundError, ValueError, FloatingPointError, MemoryError, DownloadError,
                        VerificationError)):
        return True
    from ahiq.data import DatasetError, ImageError
    from ahiq.nn.weights import CheckpointWriteError, WeightsError

    return isinstance(exc, (DatasetError, ImageError, WeightsError, CheckpointWriteError))


def train_command(argv: list[str] | None = None) -> int:
    """python train.py"""
    prepare_environment()  # before torch is loaded: OpenMP reads its settings once
    return run(TRAIN, _when_run("ahiq.engine.training", "train"), argv)


def test_command(argv: list[str] | None = None) -> int:
    """python test.py"""
    prepare_environment()
    default = (Path(__file__).resolve().parents[1] / "options" / "pipal.yaml",
               _when_run("ahiq.engine.testing", "run_default_test"))
    return run(TEST, _when_run("ahiq.engine.testing", "run_test"), argv, default=default)


def _when_run(module: str, name: str) -> Callable[[dict], object]:
    """``module.name``, imported when it runs: --help and a wrong option answer before torch is loaded."""
    def action(options: dict):
        return getattr(importlib.import_module(module), name)(options)
    return action


def run(description: str, action: Callable[[dict], object], argv: list[str] | None = None,
        default: tuple[Path, Callable[[dict], object]] | None = None) -> int:
    """Parse ``--opt`` and the overrides, run ``action`` on the options, print expected errors in one line.
    ``default``: (option file, action) for a command line without ``--opt``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="every option (its default, then its meaning; docs/training.md#options):\n"
                                            + plain_text())
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
    except Stopped as exc:
        if not exc.logged:
            print(exc, file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        if args.debug or not expected(exc):
            raise
        print(f"error: {for_the_user(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted at once (a second signal); continue a training run with train.resume=auto",
              file=sys.stderr)
        return 130
    return 0


# ---- python -m ahiq (the ahiq command) --------------------------------------------------------------------

def _pretrained(value: str):
    return {"true": True, "false": False}.get(value.lower(), value)


def _at_least(low: int):
    """An argparse type: an integer of at least ``low`` (the parser names the argument in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def ahiq_parser() -> argparse.ArgumentParser:
    program = "ahiq" if Path(sys.argv[0]).name == "ahiq" else "python -m ahiq"  # the installed command, or -m
    main = argparse.ArgumentParser(prog=program, description="AHIQ full-reference image quality")
    commands = main.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score distorted images against their references",
                                description="Score two files, two folders paired by file name, or a CSV of "
                                            "pairs (columns dist, ref). Higher is better. Under torchrun the "
                                            "processes share the pairs (give --out).")
    score.add_argument("--dist", help="distorted image or folder")
    score.add_argument("--ref", help="reference image or folder")
    score.add_argument("--pairs", help="CSV with dist,ref columns (instead of --dist/--ref)")
    score.add_argument("--checkpoint", nargs="+", default=["pipal"],
                       help="released model name(s) (python -m ahiq zoo) or checkpoint file(s); several = an "
                            "ensemble (default: pipal, the NTIRE 2022 winner, downloaded and verified on first use)")
    score.add_argument("--patch-size", type=int, default=8, choices=SCHEMA["model.patch_size"].choices,
                       help="for official checkpoints")
    score.add_argument("--vit-pretrained", default="true", help="true (timm hub), false, or a weight file")
    score.add_argument("--cnn-pretrained", default="true", help="true (timm hub), false, or a weight file")
    score.add_argument("--weights", metavar="DIR",
                       help="a weights folder (python -m ahiq download --dir DIR): every weight file from there, no "
                            "network (default: $AHIQ_WEIGHTS, else torch's hub cache and downloads)")
    score.add_argument("--allow-random-backbones", action="store_true",
                       help="score even when a backbone would have random weights (scores then mean nothing)")
    score.add_argument("--crops", default="random", choices=EVAL_CROPS)
    score.add_argument("--num-crops", type=_at_least(1), default=20, help="random crops per pair")
    score.add_argument("--seed", type=_at_least(0), default=0, help="seeds the random crops")
    score.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    score.add_argument("--precision", default="fp32", choices=PRECISIONS,
                       help="bf16: autocast (scores within about 0.01 of fp32); auto: bf16 where the device has it "
                            "natively and, on a CPU, a first-use measurement finds it faster (remembered per CPU)")
    score.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on many pairs)")
    score.add_argument("--crop-chunk", type=_at_least(1), help="most crops in one forward pass (default: as many as "
                       "fit in a share of the free memory)")
    score.add_argument("--batch-size", type=_at_least(1), default=1, help="pairs of one reference scored together")
    score.add_argument("--threads", type=_at_least(1), help="CPU threads (default: OMP_NUM_THREADS, else the CPUs this "
                       "process may use: its affinity, cgroup quota and Slurm allocation, shared by torchrun's processes)")
    score.add_argument("--out", type=Path, help="write dist,ref,score rows to this CSV (kept as they are scored)")
    score.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    score.add_argument("--maps", type=Path, metavar="DIR",
                       help="write each pair's quality maps to DIR: <name>.npz (arrays) and <name>.png (a panel)")
    score.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    score.set_defaults(usage_error=score.error)  # a missing --ref prints the score command's usage
    download = commands.add_parser("download", help="fetch released models and their backbone weights",
                                   description="Fetch released models and the backbone weights they need (or "
                                               "backbones by their timm tag) into a weights folder, to score, test "
                                               "and train offline with AHIQ_WEIGHTS=DIR or --weights DIR; without "
                                               "--dir into $AHIQ_WEIGHTS, else torch's hub cache.")
    download.add_argument("names", nargs="*", default=["pipal"],
                          help="zoo names or backbone tags (python -m ahiq zoo lists them; default: pipal)")
    download.add_argument("--dir", type=Path, metavar="DIR", help="the weights folder to fill (created)")
    download.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands.add_parser("launch", add_help=False, help="torchrun whose signal stops end in one line per process "
                        "(python -m ahiq launch --help: torchrun's arguments)")
    zoo = commands.add_parser("zoo", help="list the released models and which are cached")
    zoo.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prepare_environment()  # before torch is loaded
    if argv[:1] == ["launch"]:  # torchrun's own arguments, parsed by torchrun's parser
        from ahiq.runtime.launch import main as launch

        return launch(argv[1:])
    args = ahiq_parser().parse_args(argv)
    try:
        if args.command == "download":
            return _download(args.names, args.dir)
        if args.command == "zoo":
            return _list_zoo()
        return _score(args)
    except Exception as exc:
        if args.debug or not expected(exc):
            raise
        print(f"error: {for_the_user(exc)}", file=sys.stderr)
        return 2


def _download(names: list[str], folder: Path | None) -> int:
    for path in download(names, folder):
        print(path, flush=True)
    return 0


def _list_zoo() -> int:
    folder = weights_folder()
    print(f"weight files are looked for in {folder} ($AHIQ_WEIGHTS)" if folder else
          f"weight files are looked for in {' and '.join(map(str, cache_dirs()))} (torch's hub cache, pyiqa's) and, "
          f"for the backbones, Hugging Face's cache")
    for name, model in ZOO.items():
        found = find(model.file, folder)
        print(f"{name}: {model.description}; ViT-B/{model.patch_size}; "
              f"{f'at {found}' if found else f'missing ({model.file.name})'}")
    for tag, file in BACKBONES.items():
        found = find(file, folder)
        print(f"{tag}: backbone; {f'at {found}' if found else f'missing ({file.described()})'}")
    return 0


def _score(args) -> int:
    if not args.pairs and not (args.dist and args.ref):
        args.usage_error("give --dist and --ref, or --pairs")
    job = None
    try:
        from ahiq.data import check_images
        from ahiq.runtime.device import Runtime
        from ahiq.runtime.distributed import destroy, init_distributed
        from ahiq.scoring.scorer import Scorer, check_outputs, pair_files, pairs_from_csv, score_to_file

        job, device = init_distributed(args.device, "--device")
        pairs = pairs_from_csv(args.pairs) if args.pairs else pair_files(args.dist, args.ref)
        check_images(pairs, 1)  # unreadable images and unwritable outputs before a model is loaded or downloaded
        check_outputs(args.out, args.maps)
        runtime = Runtime(precision=args.precision, compile=args.compile, crop_chunk=args.crop_chunk,
                          threads=args.threads)
        scorer = Scorer(args.checkpoint, args.patch_size, _pretrained(args.vit_pretrained),
                        _pretrained(args.cnn_pretrained), args.crops, args.num_crops, args.seed, device,
                        args.batch_size, runtime, args.allow_random_backbones, args.weights)
        with applied(args.threads):
            score_to_file(scorer, pairs, args.out, job, args.resume, progress=True, maps=args.maps,
                          heading=f"ahiq score: {len(pairs)} pairs; {runtime.describe(device)}; {job.world} process(es)")
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    finally:
        if job is not None:
            destroy(job)
    if args.out and job.main:
        print(f"wrote {len(pairs)} scores to {args.out}")
    return 0
