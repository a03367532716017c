"""python -m ahiq score --ref REF --dist DIST --checkpoint CKPT [--out scores.csv] ... (also under torchrun)"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import EXPECTED
from .messages import for_the_user
from .signals import Stopped


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


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m ahiq", description="AHIQ full-reference image quality")
    commands = main.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score distorted images against their references",
                                description="Score two files, two folders paired by file name, or a CSV of "
                                            "pairs (columns dist, ref). Higher is better. Under torchrun the "
                                            "processes share the pairs (give --out).")
    score.add_argument("--dist", help="distorted image or folder")
    score.add_argument("--ref", help="reference image or folder")
    score.add_argument("--pairs", help="CSV with dist,ref columns (instead of --dist/--ref)")
    score.add_argument("--checkpoint", required=True, nargs="+", help="AHIQ checkpoint(s); several = an ensemble")
    score.add_argument("--patch-size", type=int, default=8, choices=(8, 16), help="for official checkpoints")
    score.add_argument("--vit-pretrained", default="true", help="true (timm hub), false, or a weight file")
    score.add_argument("--cnn-pretrained", default="true", help="true (timm hub), false, or a weight file")
    score.add_argument("--allow-random-backbones", action="store_true",
                       help="score even when a backbone would have random weights (scores then mean nothing)")
    score.add_argument("--crops", default="random", choices=("random", "five", "nine", "centre", "whole"))
    score.add_argument("--num-crops", type=_at_least(1), default=20, help="random crops per pair")
    score.add_argument("--seed", type=_at_least(0), default=0, help="seeds the random crops")
    score.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    score.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                       help="bf16: autocast (scores within about 0.01 of fp32); auto: bf16 where the device has it "
                            "natively (GPUs with bf16, CPUs with AVX512-BF16 or AMX)")
    score.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on many pairs)")
    score.add_argument("--crop-chunk", type=_at_least(1), default=64, help="most crops in one forward pass (memory)")
    score.add_argument("--batch-size", type=_at_least(1), default=1, help="pairs of one reference scored together")
    score.add_argument("--out", type=Path, help="write dist,ref,score rows to this CSV (kept as they are scored)")
    score.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    score.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return main


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if not args.pairs and not (args.dist and args.ref):
        parser().error("give --dist and --ref, or --pairs")
    dist = None
    try:
        from .distributed import destroy, init_distributed
        from .runtime import Runtime
        from .scorer import Scorer, pair_files, pairs_from_csv, score_to_file

        dist, device = init_distributed(args.device)
        pairs = pairs_from_csv(args.pairs) if args.pairs else pair_files(args.dist, args.ref)
        runtime = Runtime(precision=args.precision, compile=args.compile, crop_chunk=args.crop_chunk)
        scorer = Scorer(args.checkpoint, args.patch_size, _pretrained(args.vit_pretrained),
                        _pretrained(args.cnn_pretrained), args.crops, args.num_crops, args.seed, device,
                        args.batch_size, runtime, args.allow_random_backbones)
        score_to_file(scorer, pairs, args.out, dist, args.resume, progress=True)
    except EXPECTED as exc:
        if args.debug:
            raise
        print(f"error: {for_the_user(exc)}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(exc, file=sys.stderr)
        return exc.exit_code
    finally:
        if dist is not None:
            destroy(dist)
    if args.out and dist.main:
        print(f"wrote {len(pairs)} scores to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
