"""
Classifier-free guidance against size and motion, on a trained shapes checkpoint: samples the 48
captions with a few seeds at each (guidance, video_guidance) pair and prints the mean scores of
toy/evaluate.py, with how far the objects travel next to the data's travel.

    python toy/sweep_guidance.py --ckpt=out/tiny/ckpt.pt [--pairs=3:3,2:2] [--seeds=1,2,3,4] [--raw]
    python toy/sweep_guidance.py --pairs=2:2 --max_history=0,3,2,1   # history truncation (sample.py --max_history)

Why it matters: CFG, v = v_u + w (v_c - v_u), scales up everything the caption adds to the
unconditional prediction, and for a later frame that includes the motion. With a large video
guidance the objects move faster than the data's (travel above the data's), reach the edge of the
frame early and are squashed against it (toy/data.py never lets an object touch the outermost
pixel ring), and the last frames lose area.
"""
import argparse
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
from toy import data, evaluate  # noqa: E402

KEYS = ("shape", "direction", "size_kept", "consistency", "area_change", "travel")


def parse_pairs(text):
    """'3:3,2:2' -> [(3.0, 3.0), (2.0, 2.0)]: first-frame guidance, later-frame guidance."""
    try:
        pairs = [tuple(float(v) for v in item.split(":")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        sys.exit(f"error: --pairs wants guidance:video_guidance pairs separated by commas, got {text!r}")
    return pairs


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--ckpt", default="out/tiny/ckpt.pt")
    ap.add_argument("--pairs", default="3:3,3:2,2:2,3:1", help="guidance:video_guidance,...")
    ap.add_argument("--seeds", default="1,2,3,4", help="sampling seeds; each samples all 48 captions")
    ap.add_argument("--raw", action="store_true", help="the trained weights, not their EMA (the default)")
    ap.add_argument("--max_history", default="0", help="latent history frames kept (0: all); several: a row each")
    args = ap.parse_args(argv)
    pairs = parse_pairs(args.pairs)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        histories = [int(n) for n in args.max_history.split(",")]
    except ValueError:
        sys.exit(f"error: --seeds and --max_history want integers separated by commas, got {args.seeds!r}, "
                 f"{args.max_history!r}")
    if min(histories) < 0:
        sys.exit(f"error: --max_history must be >= 0 (0: all frames), got {args.max_history!r}")
    net, cfg, vae = sample.load(args.ckpt, use_ema=not args.raw)
    if cfg["data"] != "shapes":
        sys.exit(f"error: {args.ckpt} was trained on {cfg['data']}, not shapes")
    captions = data.SHAPE_CAPTIONS
    clips, _ = data.shapes_batch(len(captions), cfg["frames"], cfg["size"], generator=0, captions=captions)
    print(f"data: travel {evaluate.score_shapes(clips, captions)['travel']:.1f} px over {cfg['frames']} frames; "
          f"{len(seeds)} x {len(captions)} videos per row (one standard error of a fraction near 0.5: "
          f"{0.5 / np.sqrt(len(seeds) * len(captions)):.3f})")
    rows = []
    with tqdm(total=len(histories) * len(pairs) * len(seeds), desc="sampling") as bar:
        for history in histories:
            for w_first, w_later in pairs:
                scores = []
                for seed in seeds:
                    videos = sample.generate(net, captions, cfg, cfg["frames"], vae=vae, seed=seed, progress=False,
                                             guidance=w_first, video_guidance=w_later, max_history=history)
                    scores.append(evaluate.score_shapes(videos, captions))
                    bar.update(1)
                rows.append((history, w_first, w_later, {k: np.nanmean([s[k] for s in scores]) for k in KEYS}))
    print(f"\n{'history':>8}{'guidance':>9}{'video':>7}" + "".join(f"{k:>13}" for k in KEYS))
    for history, w_first, w_later, mean in rows:
        print(f"{history or 'all':>8}{w_first:>9g}{w_later:>7g}" + "".join(f"{mean[k]:>13.3f}" for k in KEYS))


if __name__ == "__main__":
    main(sys.argv[1:])
