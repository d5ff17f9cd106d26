"""
App. C.2 / Fig. 10 at laptop scale: what the corrective noise of Eq. 15 does at a jump. Without its
noise term a stage starts from the lower stage's end upsampled, constant on every 2 x 2 block; the
paper shows blocky, blurred samples. Blocks can only show where the fine detail is not predictable
from the coarse image: on flat shapes the model fills a flat block with the flat colour whatever
its start. So the test is in pixel space (32 px images, patch 4, K = 3: 32, 16, 8 px, jumps at 2
and 4 px blocks) on shapes with a texture no coarse view predicts (each object pixel kept with
probability KEEP, else black: data.shapes_batch(keep=)), with plain shapes as the control.

One model per data set (the quick start's MM-DiT, text-to-image, stages 1:1:1) is sampled on the
same captions and seeds four ways: the corrective noise at both jumps, at neither, at the first
(8 -> 16 px) alone, at the last (16 -> 32 px) alone. Measured on the final images, inside the
object (whole 4 x 4 pixel blocks whose mean brightness is above half the texture's):

  2 px / 4 px share   the energy of the variation inside 2 x 2 (4 x 4) pixel blocks over the energy
                      around the object's mean colour; 0 for an object of flat blocks. Real images
                      of the same captions give the target.

    python toy/renoise.py [--seeds=1,2] [--steps=1500]       # train.py settings --key=value apply
    python toy/renoise.py --quick                              # under a minute (tests)

Budget: two trainings of --steps steps of 48 images, then 48 captions x 2 seeds x 4 ways x 2
models: 18 minutes on a shared 2-core machine (toy/README.md). Prints a table and
ends with the line
    verdict: agrees|disagrees: textured 2 px share without / with the corrective noise: R (real: S)
(agrees: without the noise the 2 px share falls below 0.9 x the share with it, i.e. blocks appear).
Writes out/experiments/renoise/renoise.png.
"""
import contextlib
import dataclasses
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pyramid_flow as pf  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from toy import data  # noqa: E402
from toy import experiment as ex  # noqa: E402

OWN = dict(seeds="1,2", captions=48, steps=1500)
KEEP = 0.7  # an object pixel's chance to be lit in the textured data
SETTINGS = dict(vae_ckpt="", vae_steps=0, frames=1, image_ratio=1.0, size=32, patch=4, K=3, stage_ratio="1,1,1",
                batch_size=48, sample_steps="10,10,10", sample_steps_later="10,10,10", lr_decay="cosine")
QUICK = dict(max_steps=2, batch_size=6, data_pool=12, vae_steps=0)  # pixel space here too
# stages that get the corrective noise at the jump into them (k = 1: 8 -> 16 px, k = 0: 16 -> 32 px)
WAYS = {"both jumps": (0, 1), "neither": (), "first jump only": (1,), "last jump only": (0,)}
MARGIN = 0.9  # agrees: the 2 px share without the noise below MARGIN x with it


@contextlib.contextmanager
def textured(keep):
    """The shapes data source with textured objects while training (train.Video reads data.SOURCES)."""
    plain = data.SOURCES["shapes"]
    data.SOURCES["shapes"] = functools.partial(data.shapes_batch, keep=keep)
    try:
        yield
    finally:
        data.SOURCES["shapes"] = plain


def object_shares(images, keep):
    """(2 px share, 4 px share) inside the objects of images [B, 3, 1, H, W] in [-1, 1]."""
    x = images[:, :, 0].float()                                               # [B, 3, H, W]
    bright = ((x + 1) / 2).clamp(0, 1).amax(1, keepdim=True)                  # [B, 1, H, W]
    inside = (pf.up(pf.down(bright, 2), 2) > keep / 2).float()                # whole 4 x 4 blocks
    mean = (x * inside).sum((2, 3), keepdim=True) / inside.sum((2, 3), keepdim=True).clamp(min=1)
    around = ((x - mean).pow(2) * inside).sum().clamp(min=1e-12)
    return tuple(float(((x - pf.up(pf.down(x, lv), lv)).pow(2) * inside).sum() / around) for lv in (1, 2))


def train_model(cfg, out, keep, quiet):
    path = os.path.join(out, f"model_keep{keep:g}", "ckpt.pt")
    print(f"training {cfg.max_steps} steps on {'textured' if keep < 1 else 'plain'} shapes -> {path}", flush=True)
    with textured(keep):
        train.train(dataclasses.replace(cfg, out_dir=os.path.dirname(path), overwrite=True, eval_captions=0),
                    quiet=quiet)
    return path


def sample_ways(path, captions, seeds, keep):
    net, cfg, vae = sample.load(path)
    real = data.shapes_batch(len(captions), frames=1, size=cfg["size"], generator=0, captions=captions, keep=keep)[0]
    rows = {"real images": object_shares(real, keep)}
    videos = {}
    for name, stages in WAYS.items():
        shares = []
        for seed in seeds:
            v = sample.generate(net, captions, cfg, 1, vae=vae, seed=seed, renoise=set(stages), progress=False)
            shares.append(object_shares(v, keep))
            videos.setdefault(name, v)
        rows[name] = tuple(np.mean(shares, axis=0))
    return rows, videos


def main(argv):
    cfg, opts, quick = ex.parse(argv, OWN, SETTINGS, QUICK)
    out = cfg.out_dir or os.path.join(ex.EXPERIMENTS_DIR, "renoise")
    cfg = dataclasses.replace(cfg, max_steps=cfg.max_steps if quick else opts["steps"])
    captions, seeds = ex.captions_for(opts["captions"]), [int(s) for s in str(opts["seeds"]).split(",")]
    results, pictures = {}, []
    for keep, label in ((KEEP, "textured"), (1.0, "plain (control)")):
        rows, videos = sample_ways(train_model(cfg, out, keep, quick), captions, seeds, keep)
        results[label] = rows
        pictures += [("image", f"{label}: {name}", ex.thumbnails(v)) for name, v in videos.items()]
    table = [(label, name, *shares) for label, rows in results.items() for name, shares in rows.items()]
    print(f"\nK = 3 in pixel space, {len(captions)} captions x {len(seeds)} seeds; share of the variation inside "
          f"the object that lies within 2 px and 4 px blocks (0: flat blocks)")
    ex.print_table(["data", "corrective noise at", "2 px share", "4 px share"], table)
    # the textured model's four ways, then the control's first two
    ex.plot(os.path.join(out, "renoise.png"), pictures[:6],
            title="Fig. 10 analogue: the corrective noise at the jumps, textured shapes (and plain: control)")
    tex = results["textured"]
    ratio = tex["neither"][0] / max(tex["both jumps"][0], 1e-12)
    verdict = "agrees" if ratio < MARGIN else "disagrees"
    print(f"verdict: {verdict}: textured 2 px share without / with the corrective noise: {ratio:.3f} "
          f"(real: {tex['real images'][0]:.3f})")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
