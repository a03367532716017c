#!/usr/bin/env python
"""The README's quality-map picture, from the demo's checkpoint (run the quick start first):

    python scripts/maps_picture.py [--checkpoint checkpoints/demo/best.pth] [--out checkpoints/demo/maps_demo.png]

It writes into the demo's experiment folder; ``--out docs/maps_demo.png`` replaces the README's picture.

One synthetic test pair of the demo (a held-out reference, JPEG-compressed), scored with the nine-crop
ensemble: the panel shows the distorted image, where the model sees low and high quality (score map), where
it looks (weight map) and what each region adds to the score (their product).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "demo" / "best.pth")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints" / "demo" / "maps_demo.png")
    parser.add_argument("--distortion", default="jpeg_4", help="which distorted version of the test reference")
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        sys.exit(f"error: {args.checkpoint} does not exist: run the quick start first (python train.py --opt "
                 f"options/demo.yaml)")
    import cv2
    import numpy as np
    import torch

    from ahiq.data import load_parts
    from ahiq.data.images import read_image
    from ahiq.options import load_options
    from ahiq.scoring.ensemble import load_ensemble
    from ahiq.scoring.inference import maps_of
    from ahiq.scoring.maps import panel

    opt = load_options(ROOT / "options" / "demo.yaml", [f"data.root={ROOT / 'data' / 'demo'}"])
    test = load_parts(opt["data"], roles=("test",))["test"]
    index = next(i for i, p in enumerate(test.pairs) if Path(p.dist).stem.endswith(args.distortion))
    # the demo trains its backbones: its checkpoint holds them
    ensemble = load_ensemble(args.checkpoint, torch.device("cpu"), crops="nine", allow_random_backbones=True,
                             **opt["model"])
    maps = maps_of(ensemble, test.pairs, [index])[0]
    score_map, weight_map, _ = maps.image_maps()
    picture = panel(read_image(test.pairs[index].dist), score_map, weight_map,
                    (float(np.nanmin(score_map)), float(np.nanmax(score_map))),
                    f"{Path(test.pairs[index].dist).name}  score {maps.score:.4f}")
    cv2.imwrite(str(args.out), picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {args.out} (score {maps.score:.4f})")


if __name__ == "__main__":
    main()
