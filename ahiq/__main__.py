"""python -m ahiq score --ref REF --dist DIST --checkpoint CKPT [--out scores.csv] ..."""
from __future__ import annotations

import argparse
import sys

from .cli import EXPECTED


def _pretrained(value: str):
    return {"true": True, "false": False}.get(value.lower(), value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ahiq", description="AHIQ full-reference image quality")
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score distorted images against their references",
                                description="Score two files, two folders paired by file name, or a CSV of "
                                            "pairs (columns dist, ref). Higher is better.")
    score.add_argument("--dist", help="distorted image or folder")
    score.add_argument("--ref", help="reference image or folder")
    score.add_argument("--pairs", help="CSV with dist,ref columns (instead of --dist/--ref)")
    score.add_argument("--checkpoint", required=True, nargs="+", help="AHIQ checkpoint(s); several = an ensemble")
    score.add_argument("--patch-size", type=int, default=8, choices=(8, 16), help="for official checkpoints")
    score.add_argument("--vit-pretrained", default="true", help="true (timm hub), false, or a weight file")
    score.add_argument("--cnn-pretrained", default="true", help="true (timm hub), false, or a weight file")
    score.add_argument("--crops", default="random", choices=("random", "five", "nine", "centre", "whole"))
    score.add_argument("--num-crops", type=int, default=20)
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--device", default="auto")
    score.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                       help="bf16: autocast (GPUs with bf16; scores within about 0.01 of fp32)")
    score.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on many pairs)")
    score.add_argument("--crop-chunk", type=int, default=64, help="most crops in one forward pass (memory)")
    score.add_argument("--batch-size", type=int, default=1, help="pairs of one reference scored together")
    score.add_argument("--out", help="write dist,ref,score rows to this CSV")
    score.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    try:
        from .runtime import Runtime
        from .scorer import Scorer, pair_files, pairs_from_csv, write_scores

        if args.pairs:
            pairs = pairs_from_csv(args.pairs)
        elif args.dist and args.ref:
            pairs = pair_files(args.dist, args.ref)
        else:
            parser.error("give --dist and --ref, or --pairs")
        runtime = Runtime(precision=args.precision, compile=args.compile, crop_chunk=args.crop_chunk)
        scorer = Scorer(args.checkpoint, args.patch_size, _pretrained(args.vit_pretrained),
                        _pretrained(args.cnn_pretrained), args.crops, args.num_crops, args.seed, args.device,
                        args.batch_size, runtime)
        scores = scorer.score_pairs(pairs, progress=True)
    except EXPECTED as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        write_scores(args.out, pairs, scores)
        print(f"wrote {len(pairs)} scores to {args.out}")
    else:
        for pair, value in zip(pairs, scores):
            print(f"{pair.name},{value:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
