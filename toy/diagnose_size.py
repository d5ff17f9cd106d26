"""
Where the size target is lost: the per-frame statistics behind the one-number "size kept" score of
a shapes checkpoint's samples.

    python toy/diagnose_size.py --ckpt=out/tiny/ckpt.pt [--seeds=1,2] [--image] [--noise=0,0.1,0.3]

Per frame, over the 48 captions x seeds: the object's area against the data's area for its shape,
the share of videos whose area there is more than 20% off their first frame's (size kept allows
none), the centroid's step along the captioned direction (the data's: toy.data.motion_speed, 2 px
a frame for 9 frames of 32 px) and the share of objects touching the frame's edge (the data's
never do). Then size kept by shape and by direction. `--image` gives each video the first frame of a
real clip (image-to-video), so only the continuation is judged.

With a VAE checkpoint, last: the decoder's tolerance. Clips of the 48 captions are encoded, Gaussian
noise of a fraction of the latents' standard deviation (one number over all of them) is added, and
the decodings are scored (the same noise, scaled). Sizes that survive large unstructured noise
point at structured errors of the video model; how large its errors are is not measured here.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
from toy import data, evaluate  # noqa: E402


def per_frame_rows(videos, captions, data_area):
    """[T] rows of (area / data area, share more than AREA_TOLERANCE off the area of the first frame
    with an object (size kept's rule), step px, share at the edge); steps only between frames that
    both have an object (blob_tracks puts the centroid of an empty frame at 0)."""
    tracks = evaluate.blob_tracks(videos)
    area, border = tracks["area"], tracks["border"]  # [B, T]
    parsed = [data.parse_caption(c) for c in captions]
    # [B, 1]
    expected = torch.tensor([data_area[p["shape"]] for p in parsed], dtype=torch.float32)[:, None]
    present = area > 0
    first = evaluate.first_area(area, present)  # [B, 1]: size kept's reference
    off = present.any(1, keepdim=True) & ((area - first).abs() > evaluate.AREA_TOLERANCE * first)
    # [B, 2] (x, y)
    heading = torch.tensor([data.DIRECTIONS[p["direction"]] for p in parsed], dtype=torch.float32)
    # [B, T] px along the caption's way
    along = tracks["cx"] * heading[:, :1] + tracks["cy"] * heading[:, 1:]
    step = torch.where(present[:, 1:] & present[:, :-1], along.diff(dim=1), torch.nan)  # [B, T - 1]
    # [B, T]: none into frame 0
    step = torch.cat([torch.full_like(along[:, :1], torch.nan), step], 1)
    return [((area[:, t] / expected[:, 0]).mean().item(), off[:, t].float().mean().item(),
             step[:, t].nanmean().item(), (border[:, t] == 0).float().mean().item()) for t in range(area.shape[1])]


def kept_by(predictions, captions, key):
    """Size kept per value of a caption field (shape or direction)."""
    groups = {}
    for p, c in zip(predictions, captions):
        groups.setdefault(data.parse_caption(c)[key], []).append(p["size_kept"])
    return "  ".join(f"{k} {np.mean(v):.3f}" for k, v in groups.items())


@torch.no_grad()
def decoder_tolerance(vae, clips, captions, fractions, seed=0):
    """Size kept, shape and area change of decodings of the clips' latents plus noise."""
    z = vae.encode(clips)
    rows = []
    for frac in fractions:
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        scores = evaluate.score_shapes(vae.decode(z + frac * z.std() * noise).clamp(-1, 1), captions)
        rows.append((frac, scores["shape"], scores["size_kept"], scores["area_change"]))
    return rows


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--ckpt", default="out/tiny/ckpt.pt")
    ap.add_argument("--seeds", default="1,2", help="sampling seeds; each samples all 48 captions")
    ap.add_argument("--image", action="store_true", help="image-to-video: the first frame is a real one")
    ap.add_argument("--noise", default="0,0.1,0.3", help="decoder tolerance: noise as fractions of the latents' std")
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        fractions = [float(f) for f in args.noise.split(",")] if args.noise else []
    except ValueError:
        sys.exit(f"error: --seeds wants integers and --noise numbers, separated by commas; "
                 f"got {args.seeds!r}, {args.noise!r}")
    net, cfg, vae = sample.load(args.ckpt)
    if cfg["data"] != "shapes":
        sys.exit(f"error: {args.ckpt} was trained on {cfg['data']}, not shapes")
    captions = data.SHAPE_CAPTIONS
    clips, _ = data.shapes_batch(len(captions), cfg["frames"], cfg["size"], generator=0, captions=captions)
    first_area = evaluate.blob_tracks(clips)["area"][:, 0]
    data_area = {s: first_area[[i for i, c in enumerate(captions) if data.parse_caption(c)["shape"] == s]].mean().item()
                 for s in data.SHAPES}
    videos = torch.cat([sample.generate(net, captions, cfg, cfg["frames"], vae=vae, seed=seed, progress=False,
                                        prefix=clips[:, :, :1] if args.image else None) for seed in seeds])
    every = captions * len(seeds)
    scores = evaluate.score_shapes(videos, every)
    print(f"{len(every)} videos ({'image' if args.image else 'text'}-to-video, seeds {args.seeds}); the data's "
          f"areas: " + ", ".join(f"{s} {a:.0f} px" for s, a in data_area.items()))
    speed = data.motion_speed(cfg["frames"], cfg["size"], round(cfg["size"] * data.OBJECT_FRACTION), data.MARGIN)
    print(f"{'frame':>5}{'area/data':>11}{f'off >{evaluate.AREA_TOLERANCE:.0%}':>10}{'step px':>9}{'at edge':>9}   (the data: 1, 0, {speed:g}, 0)")
    for t, (ratio, off, step, edge) in enumerate(per_frame_rows(videos, every, data_area)):
        print(f"{t:>5}{ratio:>11.3f}{off:>10.3f}{'-' if np.isnan(step) else f'{step:.2f}':>9}{edge:>9.3f}")
    print(f"size kept {scores['size_kept']:.3f}; by shape: {kept_by(scores['predictions'], every, 'shape')}")
    print(f"by direction: {kept_by(scores['predictions'], every, 'direction')}")
    if vae is not None and fractions:
        print(f"\ndecoder tolerance (the {len(captions)} data clips encoded, noise added, decoded)\n"
              f"{'noise/std':>9}{'shape':>8}{'size kept':>11}{'area change':>13}")
        for frac, shape, kept, change in decoder_tolerance(vae, clips, captions, fractions):
            print(f"{frac:>9g}{shape:>8.3f}{kept:>11.3f}{change:>13.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
