"""The command lines, one parser family: train.py and test.py (options from --opt and key.path=value overrides) and
``python -m ahiq score / export / compare / download / zoo / launch / app`` (also the installed ``ahiq`` command).

The flags several commands share (--debug, --device, --weights) are declared once, as parent parsers; a flag that
sets an option takes its type, choices and meaning from the option's declaration (ahiq.options); every command
ends through one error tail (``reported``): an error a user can act on is one line instead of a traceback
(--debug shows it). Nothing here imports torch before a command needs it, so that --help, zoo and download
answer at once."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

from ahiq.data.crops import CropPlan
from ahiq.files import WriteError
from ahiq.messages import for_the_user
from ahiq.nn.downloads import DownloadError, VerificationError, download
from ahiq.nn.zoo import BACKBONES, METRIC_WEIGHTS, RELEASED, cache_dirs, find, weights_folder
from ahiq.registry.baselines import BASELINES
from ahiq.options import SCHEMA, OptionsError, load_options, plain, plain_text
from ahiq.runtime.signals import Stopped
from ahiq.runtime.threads import applied, prepare_environment

TRAIN = "Train AHIQ: python train.py --opt options/pipal.yaml [key.path=value ...]"
TEST = ("Test AHIQ checkpoints, or write an NTIRE 2022 submission: python test.py --opt options/pipal.yaml "
        "[key.path=value ...]. Without --opt: options/pipal.yaml, testing its experiment's best checkpoint, or the "
        "released model before one exists.")


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors (a missing argument, a value out of its choices) are one line, as every other
    error of the command lines; the usage is for --help. Its subcommands' parsers are of this class too."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _parent(*add: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = Parser(add_help=False)
    for adding in add:
        adding(parser)
    return parser


# The flags several commands share, each declared once.
DEBUG = _parent(lambda p: p.add_argument("--debug", action="store_true", help="show the full traceback on errors"))
DEVICE = _parent(lambda p: p.add_argument("--device", help="auto (the default: CUDA where there is a GPU), cpu, cuda "
                                                           "or cuda:N"))
WEIGHTS = _parent(lambda p: p.add_argument(
    "--weights", metavar="DIR", help="a weights folder (python -m ahiq download --dir DIR): every weight file from "
                                     "there, no network (default: $AHIQ_WEIGHTS, else torch's hub cache and downloads)"))


def expected(exc: BaseException) -> bool:
    """An error the user can act on, printed as one line; those that bring torch are imported only for an
    error that is none of the others."""
    if isinstance(exc, (OptionsError, FileNotFoundError, ValueError, FloatingPointError, MemoryError, DownloadError,
                        VerificationError, ImportError)):
        return True
    from ahiq.data import DatasetError, ImageError
    from ahiq.nn.weights import CheckpointWriteError, WeightsError

    return isinstance(exc, (DatasetError, ImageError, WeightsError, CheckpointWriteError))


def reported(action: Callable[[], int | None], debug: bool, interrupted: str) -> int:
    """Every command's end: ``action``'s exit status (None: 0); a stop signal's status with its one line; a file
    that could not be written (a full disk, a folder turned read-only: ahiq.files.WriteError) as ``error: ...``
    on one line, status 1; another expected error (bad input) likewise, status 2 (``debug``: the traceback); a
    second Ctrl-C as the one line ``interrupted`` (what was left, and how to go on), status 130."""
    try:
        return action() or 0
    except Stopped as exc:
        if not exc.logged:
            print(exc, file=sys.stderr)
        return exc.exit_code
    except WriteError as exc:
        if debug:
            raise
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if debug or not expected(exc):
            raise
        print(f"error: {for_the_user(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


# ---- train.py and test.py ----------------------------------------------------------------------------------

def train_command(argv: list[str] | None = None) -> int:
    """python train.py"""
    prepare_environment()  # before torch is loaded: OpenMP reads its settings once
    return run(TRAIN, _when_run("ahiq.engine.training", "train"), argv,
               interrupted="interrupted at once (a second signal); continue a training run with train.resume=auto")


def test_command(argv: list[str] | None = None) -> int:
    """python test.py"""
    prepare_environment()
    default = (Path(__file__).resolve().parents[1] / "options" / "pipal.yaml",
               _when_run("ahiq.engine.testing", "run_default_test"))
    return run(TEST, _when_run("ahiq.engine.testing", "run_test"), argv, default=default,
               interrupted="interrupted at once (a second signal): each file written is whole, the baselines' scores "
                           "are kept; run the same command again")


def _when_run(module: str, name: str) -> Callable[[dict], object]:
    """``module.name``, imported when it runs: --help and a wrong option answer before torch is loaded."""
    def action(options: dict):
        return getattr(importlib.import_module(module), name)(options)
    return action


def run(description: str, action: Callable[[dict], object], argv: list[str] | None = None,
        default: tuple[Path, Callable[[dict], object]] | None = None,
        interrupted: str = "interrupted at once (a second signal)") -> int:
    """Parse ``--opt`` and the overrides, run ``action`` on the options, print expected errors in one line.
    ``default``: (option file, action) for a command line without ``--opt``; ``interrupted``: the line of a second
    Ctrl-C."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[DEVICE, WEIGHTS, DEBUG],
                                     epilog="every option (its default, then its meaning; docs/training.md#options):\n"
                                            + plain_text())
    parser.add_argument("--opt", required=default is None, type=Path,
                        help="YAML option file, e.g. options/pipal.yaml" + (f" (default {default[0]})" if default else ""))
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override any option, e.g. train.epochs=10 name=try2 (values parsed as YAML); "
                             "--weights DIR is model.weights=DIR, --device D train.device=D")
    args = parser.parse_args(argv)
    for flag, key in (("weights", "model.weights"), ("device", "train.device")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")
    if args.opt is None:
        args.opt, action = default

    def go() -> None:
        options = load_options(args.opt, args.overrides)
        with applied(options["runtime"]["threads"]):
            action(options)
    return reported(go, args.debug, interrupted)


# ---- python -m ahiq (the ahiq command) --------------------------------------------------------------------

def _at_least(low: int, high: int | None = None):
    """An argparse type: an integer of at least ``low`` (and at most ``high``); the parser names the argument in
    its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be at least {low}" + (f" and at most {high}" if high is not None
                                                                          else "") + f", got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _option_flag(parser: argparse.ArgumentParser, flag: str, key: str, note: str = "", **extra) -> None:
    """A flag that sets the option ``key``: its choices or lowest value and its meaning from the option's
    declaration (ahiq.options), ``note`` after the meaning."""
    option = SCHEMA[key]
    typed = {}
    if option.choices:
        typed = {"choices": option.choices, "type": type(option.choices[0])}
    elif option.at_least is not None:
        typed = {"type": _at_least(int(option.at_least), None if option.at_most is None else int(option.at_most))}
    parser.add_argument(flag, help=plain(option.meaning).replace("%", "%%") + note, **typed, **extra)


def _pretrained(value: str | None):
    return {"true": True, "false": False}.get((value or "true").lower(), value)


def _model_arguments(parser: argparse.ArgumentParser, use: str) -> None:
    """The arguments that choose a trained model: score's and export's."""
    parser.add_argument("--checkpoint", nargs="+",
                        help=f"released model name(s) (python -m ahiq zoo) or checkpoint file(s), {use}; several = an "
                             f"ensemble (default: {RELEASED.default.name}, {RELEASED.default.summary}; downloaded and "
                             f"verified on first use)")
    _option_flag(parser, "--patch-size", "model.patch_size", " (for official checkpoints given by path)")
    for part in ("vit", "cnn"):
        parser.add_argument(f"--{part}-pretrained", help=plain(SCHEMA[f"model.{part}_pretrained"].meaning))
    parser.add_argument("--allow-random-backbones", action="store_true",
                        help="go on even when a backbone would have random weights (scores then mean nothing)")


# The crop ensemble every way of scoring takes unless told (CropPlan's defaults: test.py's options'), at the
# model's crop size.
DEFAULT_CROPS = CropPlan(size=0).described()


def _crop_arguments(parser: argparse.ArgumentParser, default: str) -> None:
    _option_flag(parser, "--crops", "test.crops", f" (default: {default})")
    _option_flag(parser, "--num-crops", "test.num_crops")
    _option_flag(parser, "--seed", "test.seed")


# The score command's arguments that only PyTorch runs: none of them goes with --onnx.
TORCH_ONLY = ("checkpoint", "patch_size", "vit_pretrained", "cnn_pretrained", "weights", "allow_random_backbones",
              "device", "precision", "compile")
# What an interrupted command (Ctrl-C; the score command's second one) leaves, and how to go on.
INTERRUPTED = {
    "score": "the scores journaled so far are kept with --out; the same command with --resume scores the rest",
    "export": "no export was written (an earlier one in --out is as it was); run the command again",
    "compare": "run the command again (each file it wrote is whole)",
    "download": "no partial file was kept; run the command again to fetch what is missing",
    "zoo": "nothing was changed",
    "app": "the page stopped",
}


def ahiq_parser() -> argparse.ArgumentParser:
    program = "ahiq" if Path(sys.argv[0]).name == "ahiq" else "python -m ahiq"  # the installed command, or -m
    main = Parser(prog=program, description="AHIQ full-reference image quality")
    commands = main.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", parents=[DEVICE, WEIGHTS, DEBUG],
                                help="score distorted images against their references",
                                description="Score two files, two folders paired by file name, or a CSV of "
                                            "pairs (columns dist, ref). Higher is better. Under torchrun the "
                                            "processes share the pairs (give --out).")
    score.add_argument("--dist", help="distorted image or folder")
    score.add_argument("--ref", help="reference image or folder")
    score.add_argument("--pairs", help="CSV with dist,ref columns (instead of --dist/--ref)")
    _model_arguments(score, "scoring with PyTorch")
    score.add_argument("--onnx", type=Path, metavar="DIR", help="score with an ONNX export (python -m ahiq export) "
                       "on onnxruntime, without torch, instead of a PyTorch model")
    _crop_arguments(score, f"the ONNX export's ensemble, else {DEFAULT_CROPS}")
    _option_flag(score, "--precision", "runtime.precision", f" (default: {SCHEMA['runtime.precision'].default})")
    score.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on many pairs)")
    _option_flag(score, "--crop-chunk", "runtime.crop_chunk")
    score.add_argument("--batch-size", type=_at_least(1), default=1, help="pairs of one reference scored together")
    _option_flag(score, "--threads", "runtime.threads")
    score.add_argument("--out", type=Path, help="write dist,ref,score rows to this CSV (kept as they are scored)")
    score.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    score.add_argument("--maps", type=Path, metavar="DIR",
                       help="write each pair's quality maps to DIR: <name>.npz (arrays) and <name>.png (a panel)")
    export = commands.add_parser("export", parents=[WEIGHTS, DEBUG],
                                 help="write AHIQ as ONNX graphs, to score without torch",
                                 description="Write a checkpoint (several: an ensemble) as ONNX graphs with a dynamic "
                                             "batch and ahiq_onnx.json (crop size, normalisation, crop ensemble, "
                                             "digests) into --out, checked against PyTorch's scores with "
                                             "onnxruntime. Score with them: python -m ahiq score --onnx DIR ... "
                                             "(needs pip install onnx onnxscript 'onnxruntime>=1.25' here; numpy, "
                                             "OpenCV and onnxruntime where it scores).")
    export.add_argument("--out", type=Path, metavar="DIR", required=True, help="the export folder (created)")
    _model_arguments(export, "exported")
    _crop_arguments(export, f"{DEFAULT_CROPS}: the ensemble the export's scorer uses unless told")
    download = commands.add_parser("download", parents=[DEBUG], help="fetch released models and their backbone weights",
                                   description="Fetch released models and the backbone weights they need (or "
                                               "backbones by their timm tag) into a weights folder, to score, test "
                                               "and train offline with AHIQ_WEIGHTS=DIR or --weights DIR; without "
                                               "--dir into $AHIQ_WEIGHTS, else torch's hub cache.")
    download.add_argument("names", nargs="*", default=[RELEASED.default.name],
                          help=f"zoo names or backbone tags (python -m ahiq zoo lists them; default: "
                               f"{RELEASED.default.name})")
    download.add_argument("--dir", type=Path, metavar="DIR", help="the weights folder to fill (created)")
    compare = commands.add_parser("compare", parents=[DEBUG],
                                  help="compare test.py results of several models on the same images",
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
    for flag, key in (("--resamples", "test.bootstrap.resamples"), ("--by", "test.bootstrap.by"),
                      ("--seed", "test.bootstrap.seed")):
        _option_flag(compare, flag, key, " (default %(default)s)", default=SCHEMA[key].default)
    app = commands.add_parser("app", parents=[DEVICE, WEIGHTS, DEBUG],
                              help="a web page that scores, ranks and maps uploaded images (needs the app extra)",
                              description="Serve a page (Gradio; pip install -e '.[app]') where a reference and "
                                          "distorted versions of it are scored as the score command scores them, "
                                          "ranked beside PSNR, SSIM and the other baselines, with quality maps; also "
                                          "the API endpoint /score for Gradio clients (docs/scoring.md#the-web-page).")
    _model_arguments(app, "scoring on the page")
    _crop_arguments(app, DEFAULT_CROPS)
    _option_flag(app, "--precision", "runtime.precision", f" (default: {SCHEMA['runtime.precision'].default})")
    _option_flag(app, "--threads", "runtime.threads")
    app.add_argument("--baselines", nargs="*", metavar="NAME",
                     help=f"the baselines shown beside AHIQ, of {', '.join(BASELINES)} (default: every one that can "
                          f"run here: piq installed, a learned one's weights found)")
    app.add_argument("--host", default="127.0.0.1", help="the address to listen on (default %(default)s: this machine "
                                                          "only; 0.0.0.0: every network interface)")
    app.add_argument("--port", type=_at_least(1, 65535), default=7860, help="the port (default %(default)s)")
    for command in (score, compare):
        command.set_defaults(usage_error=command.error)  # a missing --ref prints the command's own usage
    commands.add_parser("launch", add_help=False, help="torchrun whose signal stops end in one line per process "
                        "(python -m ahiq launch --help: torchrun's arguments)")
    commands.add_parser("zoo", parents=[DEBUG], help="list the released models and which are cached")
    return main


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prepare_environment()  # before torch is loaded
    if argv[:1] == ["launch"]:  # torchrun's own arguments, parsed by torchrun's parser
        from ahiq.runtime.launch import main as launch

        return launch(argv[1:])
    args = ahiq_parser().parse_args(argv)
    actions = {"download": lambda: _download(args.names, args.dir), "zoo": _list_zoo,
               "export": lambda: _export(args), "compare": lambda: _compare(args), "score": lambda: _score(args),
               "app": lambda: _app(args)}
    return reported(actions[args.command], args.debug, f"interrupted: {INTERRUPTED[args.command]}")


def _download(names: list[str], folder: Path | None) -> None:
    for path in download(names, folder):
        print(path, flush=True)


def _list_zoo() -> None:
    folder = weights_folder()
    print(f"weight files are looked for in {folder} ($AHIQ_WEIGHTS)" if folder else
          f"weight files are looked for in {' and '.join(map(str, cache_dirs()))} (torch's hub cache, pyiqa's) and, "
          f"for the backbones, Hugging Face's cache")
    for name, model in RELEASED.items():
        found = find(model.file, folder)
        print(f"{name}: {model.summary}; ViT-B/{model.patch_size}; "
              f"{f'at {found}' if found else f'missing ({model.file.name})'}")
    for tag, file in BACKBONES.items():
        found = find(file, folder)
        print(f"{tag}: backbone; {f'at {found}' if found else f'missing ({file.described()})'}")
    for name, files in METRIC_WEIGHTS.items():
        places = [(file, find(file, folder)) for file in files]
        print(f"{name}: baseline metric weights; " + ", ".join(f"at {found}" if found else f"missing ({file.name})"
                                                               for file, found in places))


def _given(args, *names: str) -> dict:
    """The arguments of ``names`` that were given (the rest take the scorer's own defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) not in (None, False)}


def _model_settings(args) -> dict:
    """The model and crop arguments, as ahiq.Scorer's keyword arguments."""
    settings = _given(args, "checkpoint", "patch_size", "vit_pretrained", "cnn_pretrained", "weights",
                      "allow_random_backbones", "crops", "num_crops", "seed")
    return {name: _pretrained(value) if name.endswith("_pretrained") else value for name, value in settings.items()}


def _scorer_settings(args) -> dict:
    """ahiq.Scorer's keyword arguments from the model, crop and runtime arguments (score's and app's)."""
    from ahiq.runtime.device import Runtime

    return {**_model_settings(args),
            "runtime": Runtime(precision=args.precision or SCHEMA["runtime.precision"].default,
                               compile=getattr(args, "compile", False), crop_chunk=getattr(args, "crop_chunk", None),
                               threads=args.threads)}


def _score(args) -> int:
    if not args.pairs and not (args.dist and args.ref):
        args.usage_error("give --dist and --ref, or --pairs")
    if args.onnx:
        given = [f"--{name.replace('_', '-')}" for name in TORCH_ONLY if getattr(args, name) not in (None, False)]
        if given:
            args.usage_error(f"--onnx scores with the export's own models on onnxruntime: leave out {', '.join(given)}")
    from ahiq.engine.score_files import score_files

    settings = _given(args, "crops", "num_crops", "seed", "crop_chunk") if args.onnx else _scorer_settings(args)
    return score_files(args.dist, args.ref, args.pairs, args.out, args.resume, args.maps, args.onnx, args.device,
                       args.threads, args.batch_size, **settings)


def _compare(args) -> None:
    if len(args.results) < 2:
        args.usage_error("give two or more result folders to compare")
    from ahiq.engine.compare import compare

    compare(args.results, args.out, args.resamples, args.by, args.seed, args.names)


def _export(args) -> None:
    from ahiq.scoring.export import export_command

    export_command(args.out, **_model_settings(args))


def _app(args) -> None:
    from ahiq.app import serve

    with applied(args.threads):
        serve(args.host, args.port, args.device, args.baselines, **_scorer_settings(args))
