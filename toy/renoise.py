"""
App. C.2 / Fig. 10 at laptop scale: what the corrective noise of Eq. 15 does at a jump. One trained
pyramid checkpoint is sampled twice on the same captions and seeds: as trained (renoise: the
upsampled end of the lower stage, rescaled, plus the block-decorrelating noise n') and without the
noise term (renoise=False, pf.renoise(corrective=False): only the rescaled nearest upsampling).
Without n' the start of the next stage is constant on every 2 x 2 block, a start the model never
saw in training; the paper shows blur and block artefacts. Measured here:

  block share   the energy of the variation inside the jump's 2 x 2 blocks over the energy around
                the mean (x - Up(Down(x)) against x - mean, per frame): 0 for a picture made of
                flat blocks. Right after the jump on the latents the model is given, and at the
                end on the decoded pixels (blocks of 2 x the VAE's factor: 8 px), next to the same
                share of real clips.
  scores        toy/evaluate.py's caption scores and the pixel Frechet distance to real clips.

    python toy/renoise.py [--ckpt=PATH] [--seeds=1,2] [--steps=600]
    python toy/renoise.py --quick                                       # seconds (tests)

--ckpt: default out/tiny/ckpt.pt (the quick start) if it exists, else a short run of the quick
start's recipe (--steps steps, trained into out/experiments/renoise/model, reused next time;
train.py settings --key=value apply to it). Budget: sampling 48 captions x 2 seeds x 2 ways
(about a minute on an idle 2-core CPU); with no checkpoint, plus 600 training steps of 48 clips
(about 3 minutes) and the shared VAE (about 3.5, once): 8 minutes at most (NOTES-experiments.md). Prints one table;
writes out/experiments/renoise/renoise.png (the two grids side by side: first | last frame).
"""
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pyramid_flow as pf  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from toy import experiment as ex  # noqa: E402

QUICK_START = os.path.join("out", "tiny", "ckpt.pt")
OWN = dict(ckpt="", seeds="1,2", captions=48, steps=600)
KEYS = ("colour", "shape", "direction", "size_kept", "consistency", "frechet")


def block_share(x, levels=1):
    """Energy inside the blocks of 2^levels pixels over the energy around each frame's mean:
    x [..., H, W] -> a float in [0, 1]; 0 when x is constant on every block."""
    within = x - pf.up(pf.down(x, levels), levels)
    around = x - x.mean(dim=(-2, -1), keepdim=True)
    return float(within.pow(2).sum() / around.pow(2).sum().clamp(min=1e-12))


def checkpoint(argv):
    """(the checkpoint to sample: --ckpt, the quick start's, or a short run trained here; the
    options; the folder of the PNG: --out_dir or out/experiments/renoise)."""
    cfg, opts, quick = ex.parse(argv, OWN, {}, dict(max_steps=2, frames=5))
    out = cfg.out_dir or os.path.join(ex.EXPERIMENTS_DIR, "renoise")
    if opts["ckpt"]:
        return opts["ckpt"], opts, out
    if os.path.exists(QUICK_START) and not quick and not cfg.out_dir:
        return QUICK_START, opts, out
    path = os.path.join(out, "model", "ckpt.pt")
    if os.path.exists(path) and not quick:
        print(f"using the model trained here before: {path}")
        return path, opts, out
    cfg = ex.with_vae(cfg, cfg.out_dir or ex.EXPERIMENTS_DIR, quiet=quick)
    steps = cfg.max_steps if quick else opts["steps"]
    print(f"no checkpoint given and none at {QUICK_START}: training {steps} steps of the quick start's recipe")
    train.train(dataclasses.replace(cfg, max_steps=steps, out_dir=os.path.dirname(path), overwrite=True,
                                    eval_captions=0), quiet=quick)
    return path, opts, out


def sample_both(net, cfg, vae, captions, seeds):
    """Per way (renoise on, off): mean scores, block shares and the first seed's videos."""
    jump_levels = 1  # every jump doubles the resolution: its blocks are 2 x 2
    pixel_levels = jump_levels + int(np.log2(vae.cfg.spatial_factor)) if vae is not None else jump_levels
    results = {}
    for renoise in (True, False):
        rows, after_jump, videos0 = [], [], None
        for seed in seeds:
            def watch(x, k, t):
                if t == 0 and k < cfg["K"] - 1:  # the first state of a stage that a jump started
                    after_jump.append(block_share(x, jump_levels))
            videos = sample.generate(net, captions, cfg, cfg["frames"], vae=vae, seed=seed, renoise=renoise,
                                     progress=False, watch=watch)
            rows.append(ex.score(videos, captions) | dict(end_share=block_share(videos, pixel_levels)))
            videos0 = videos if videos0 is None else videos0
        mean = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
        results["with corrective noise" if renoise else "without (renoise=False)"] = \
            mean | dict(jump_share=float(np.mean(after_jump)), videos=videos0)
    real = ex.real_clips(captions, videos0.shape[2], videos0.shape[-1])
    return results, block_share(real, pixel_levels), pixel_levels


def main(argv):
    path, opts, out = checkpoint(argv)
    net, cfg, vae = sample.load(path)
    if cfg["K"] < 2:
        raise SystemExit(f"error: {path} has K = 1: no jump to renoise at")
    if cfg["data"] != "shapes":
        raise SystemExit(f"error: {path} was trained on {cfg['data']}; the scores here are for shapes")
    captions = ex.captions_for(opts["captions"])
    seeds = [int(s) for s in str(opts["seeds"]).split(",")]
    results, real_share, pixel_levels = sample_both(net, cfg, vae, captions, seeds)
    print(f"\n{path}: K = {cfg['K']}, {len(captions)} captions x {len(seeds)} seeds, sample steps "
          f"{cfg['sample_steps']} / later frames {cfg['sample_steps_later']}")
    ex.print_table(["sampling", *KEYS, "share after jump", "share at end"],
                   [(n, *(r[k] for k in KEYS), r["jump_share"], r["end_share"]) for n, r in results.items()])
    print(f"block share of real clips at the end's block size ({2 ** pixel_levels} px): {real_share:.3f}; "
          f"after the jump: latents the model starts the stage from (0 = flat 2 x 2 blocks)")
    ex.plot(os.path.join(out, "renoise.png"),
            [("image", f"{n} (first | last frame)", ex.thumbnails(r["videos"])) for n, r in results.items()],
            title="Fig. 10 analogue: the same checkpoint and seeds, with and without the corrective noise")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
