"""The command lines: train.py and test.py (options from --opt and key.path=value overrides) and
``python -m ahiq score / download / zoo / launch`` (also the installed ``ahiq`` command). Errors a user can
act on are printed as one line instead of a traceback (--debug shows it). Nothing here imports torch before
a command needs it, so that --help, zoo and download answer at once."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

from ahiq.messages import for_the_user
from ahiq.nn.downloads import DownloadError, VerificationError, download
from ahiq.nn.zoo import BACKBONES, METRIC_WEIGHTS, ZOO, cache_dirs, find, weights_folder
from ahiq.options import BOOTSTRAP_UNITS, EVAL_CROPS, PRECISIONS, SCHEMA, OptionsError, load_options, plain_text
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
                        VerificationError, ImportError)):
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

def _pretrained(value: str | None):
    return {"true": True, "false": False}.get((value or "true").lower(), value)


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


def _model_arguments(parser: argparse.ArgumentParser, use: str) -> None:
    """The arguments that choose a trained model: score's and export's."""
    parser.add_argument("--checkpoint", nargs="+",
                        help=f"released model name(s) (python -m ahiq zoo) or checkpoint file(s), {use}; several = an "
                             f"ensemble (default: pipal, the NTIRE 2022 winner, downloaded and verified on first use)")
    parser.add_argument("--patch-size", type=int, choices=SCHEMA["model.patch_size"].choices,
                        help="for official checkpoints (default 8)")
    parser.add_argument("--vit-pretrained", help="true (the default: the released weights), false, or a weight file")
    parser.add_argument("--cnn-pretrained", help="true (the default: the released weights), false, or a weight file")
    parser.add_argument("--weights", metavar="DIR",
                        help="a weights folder (python -m ahiq download --dir DIR): every weight file from there, no "
                             "network (default: $AHIQ_WEIGHTS, else torch's hub cache and downloads)")
    parser.add_argument("--allow-random-backbones", action="store_true",
                        help="go on even when a backbone would have random weights (scores then mean nothing)")


# The model arguments and what only PyTorch runs: none of them goes with --onnx.
TORCH_ONLY = ("checkpoint", "patch_size", "vit_pretrained", "cnn_pretrained", "weights", "allow_random_backbones",
              "device", "precision", "compile")


def _crop_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--crops", choices=EVAL_CROPS, help=f"the crop ensemble {default}")
    parser.add_argument("--num-crops", type=_at_least(1), help="random crops per pair")
    parser.add_argument("--seed", type=_at_least(0), help="seeds the random crops")


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
    _model_arguments(score, "scoring with PyTorch")
    score.add_argument("--onnx", type=Path, metavar="DIR", help="score with an ONNX export (python -m ahiq export) "
                       "on onnxruntime, without torch, instead of a PyTorch model")
    _crop_arguments(score, "(default: the ONNX export's ensemble, else 20 random crops, seed 0)")
    score.add_argument("--device", help="auto (the default), cpu, cuda or cuda:N")
    score.add_argument("--precision", choices=PRECISIONS,
                       help="fp32 (the default); bf16: autocast (scores within about 0.01 of fp32); auto: bf16 where "
                            "the device has it natively and, on a CPU, a first-use measurement finds it faster "
                            "(remembered per CPU)")
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
    export = commands.add_parser("export", help="write AHIQ as ONNX graphs, to score without torch",
                                 description="Write a checkpoint (several: an ensemble) as ONNX graphs with a dynamic "
                                             "batch and ahiq_onnx.json (crop size, normalisation, crop ensemble, "
                                             "digests) into --out, checked against PyTorch's scores with "
                                             "onnxruntime. Score with them: python -m ahiq score --onnx DIR ... "
                                             "(needs pip install onnx onnxscript 'onnxruntime>=1.25' here; numpy, OpenCV and onnxruntime "
                                             "where it scores).")
    export.add_argument("--out", type=Path, metavar="DIR", required=True, help="the export folder (created)")
    _model_arguments(export, "exported")
    _crop_arguments(export, "that the export's scorer uses by default (default: 20 random crops, seed 0)")
    export.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    download = commands.add_parser("download", help="fetch released models and their backbone weights",
                                   description="Fetch released models and the backbone weights they need (or "
                                               "backbones by their timm tag) into a weights folder, to score, test "
                                               "and train offline with AHIQ_WEIGHTS=DIR or --weights DIR; without "
                                               "--dir into $AHIQ_WEIGHTS, else torch's hub cache.")
    download.add_argument("names", nargs="*", default=["pipal"],
                          help="zoo names or backbone tags (python -m ahiq zoo lists them; default: pipal)")
    download.add_argument("--dir", type=Path, metavar="DIR", help="the weights folder to fill (created)")
    download.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    compare = commands.add_parser("compare", help="compare test.py results of several models on the same images",
                                  description="Each model's SROCC, PLCC, KROCC and RMSE with 95%% intervals, and every "
                                              "pairwise difference tested at 95%% (Williams' test on SROCC and PLCC, "
                                              "the F-test on the residuals): compare.md, compare.csv, compare.tex "
                                              "and compare.png/.pdf in --out (docs/evaluation.md).")
    compare.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                         help="test.py result folders (checkpoints/<name>/test, .../test/baselines/<metric>) or their "
                              "results.txt; two or more")
    compare.add_argument("--out", type=Path, metavar="DIR",
                         help="where to write (created; default: compare/ in the folders' common folder)")
    compare.add_argument("--names", nargs="+", metavar="NAME",
                         help="the models' names in the tables, one per folder (default: each experiment's name, or "
                              "the metric's)")
    compare.add_argument("--resamples", type=_at_least(0), default=SCHEMA["test.bootstrap.resamples"].default,
                         help="bootstrap resamples of the intervals (default %(default)s; 0: none)")
    compare.add_argument("--by", choices=BOOTSTRAP_UNITS, default=SCHEMA["test.bootstrap.by"].default,
                         help="what the bootstrap resamples (default %(default)s)")
    compare.add_argument("--seed", type=_at_least(0), default=SCHEMA["test.bootstrap.seed"].default,
                         help="seeds the bootstrap (default %(default)s)")
    compare.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    compare.set_defaults(usage_error=compare.error)
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
        if args.command == "export":
            return _export(args)
        if args.command == "compare":
            return _compare(args)
        return _score(args)
    except Exception as exc:
        if args.debug or not expected(exc):
            raise
        print(f"error: {for_the_user(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {INTERRUPTED[args.command]}", file=sys.stderr)
        return 130


# What an interrupted command (Ctrl-C; the score command's second one) leaves, and how to go on.
INTERRUPTED = {
    "score": "the scores journaled so far are kept with --out; the same command with --resume scores the rest",
    "export": "no export was written (an earlier one in --out is as it was); run the command again",
    "compare": "run the command again (each file it wrote is whole)",
    "download": "no partial file was kept; run the command again to fetch what is missing",
    "zoo": "nothing was changed",
}


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
    for name, files in METRIC_WEIGHTS.items():
        places = [(file, find(file, folder)) for file in files]
        print(f"{name}: baseline metric weights; " + ", ".join(f"at {found}" if found else f"missing ({file.name})"
                                                               for file, found in places))
    return 0


def _score(args) -> int:
    if not args.pairs and not (args.dist and args.ref):
        args.usage_error("give --dist and --ref, or --pairs")
    if args.onnx:
        given = [f"--{name.replace('_', '-')}" for name in TORCH_ONLY if getattr(args, name) not in (None, False)]
        if given:
            args.usage_error(f"--onnx scores with the export's own models on onnxruntime: leave out {', '.join(given)}")
    job = None
    try:
        from ahiq.data.pairs import check_images, pair_files, pairs_from_csv
        from ahiq.scoring.output import check_outputs, score_to_file

        if args.onnx:
            from ahiq.runtime.job import Job
            from ahiq.scoring.onnx_scorer import OnnxScorer

            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("--onnx scores in one process: run it without torchrun")
            job = Job()
        else:
            from ahiq.runtime.distributed import init_distributed

            job, device = init_distributed(args.device or "auto", "--device")
        pairs = pairs_from_csv(args.pairs) if args.pairs else pair_files(args.dist, args.ref)
        check_images(pairs, 1)  # unreadable images and unwritable outputs before a model is loaded or downloaded
        check_outputs(args.out, args.maps)
        if args.onnx:
            scorer = OnnxScorer(args.onnx, args.crops, args.num_crops, args.seed, args.batch_size, args.crop_chunk,
                                args.threads)
            described = scorer.describe()
        else:
            from ahiq.runtime.device import Runtime

            runtime = Runtime(precision=args.precision or "fp32", compile=args.compile, crop_chunk=args.crop_chunk,
                              threads=args.threads)
            scorer = _scorer(args, device, runtime)
            described = f"{runtime.describe(device)}; {job.world} process(es)"
        with contextlib.nullcontext() if args.onnx else applied(args.threads):  # torch's threads: not onnxruntime's
            score_to_file(scorer, pairs, args.out, job, args.resume, progress=True, maps=args.maps,
                          heading=f"ahiq score: {len(pairs)} pairs; {described}")
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    finally:
        if job is not None and job.world > 1:
            from ahiq.runtime.distributed import destroy

            destroy(job)
    if args.out and job.main:
        print(f"wrote {len(pairs)} scores to {args.out}")
    return 0


def _scorer(args, device, runtime=None):
    """The PyTorch Scorer of the model and crop arguments (their defaults: pipal, 20 random crops, seed 0)."""
    from ahiq.runtime.device import Runtime
    from ahiq.scoring.scorer import Scorer

    return Scorer(args.checkpoint or ["pipal"], args.patch_size or 8, _pretrained(args.vit_pretrained),
                  _pretrained(args.cnn_pretrained), args.crops or "random",
                  20 if args.num_crops is None else args.num_crops, 0 if args.seed is None else args.seed, device,
                  getattr(args, "batch_size", 1), runtime or Runtime(), args.allow_random_backbones, args.weights)


def _compare(args) -> int:
    if len(args.results) < 2:
        args.usage_error("give two or more result folders to compare")
    from ahiq.engine.compare import compare

    compare(args.results, args.out, args.resamples, args.by, args.seed, args.names)
    return 0


def _export(args) -> int:
    import torch

    from ahiq.scoring.export import check_export_folder, check_exporter, export

    check_exporter()  # the exporter's packages and the folder before a model is loaded or downloaded
    check_export_folder(args.out)
    scorer = _scorer(args, torch.device("cpu"))
    settings = export(scorer.models, args.out, scorer.plan)
    plan, verified = scorer.plan, settings["verified"]
    crops = f"{plan.count} random crops, seed {plan.seed}" if plan.mode == "random" else f"{plan.mode} crops"
    print(f"wrote {args.out}: {len(scorer.models)} model(s) as ONNX graphs, {crops} by default; onnxruntime scored "
          f"within {verified['max_abs_diff_from_pytorch']:.1e} of PyTorch on {verified['crops']} random crops. Score "
          f"with it: python -m ahiq score --onnx {args.out} --dist ... --ref ...")
    return 0
