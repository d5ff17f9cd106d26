"""
The exact velocity of the shapes images, and which pyramid stage of a trained model loses quality.

A caption of toy/data.py has finitely many images (one sprite at 20 x 20 whole-pixel positions at
32 px), so the best possible network is computable: on the coupled path of stage k (Eqs. 6, 9-10)

    x_t = t e X + (1 - t) s Up(Down(X)) + d n,    d = t (1 - e) + (1 - t)(1 - s),

each candidate image X has a Gaussian likelihood, and E[end - start | x_t] (Eq. 11) is their
posterior-weighted velocity. Sampling with it checks the whole pipeline (Algorithm 1, renoising,
the scorer) without learning anything; swapping it in for the model at some stages shows where a
trained model falls short:

    python toy/oracle.py                                 # the oracle alone: colour and shape 1.0
    python toy/oracle.py --ckpt=out/tiny/ckpt.pt         # the model at each stage alone, and at all

Text-to-image only (first frames), pixel-space checkpoints only. Tensor legend: images [B, C, H, W].
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pyramid_flow as pf  # noqa: E402
from toy import data, evaluate  # noqa: E402


def caption_images(caption, size=32, draws=6000):
    """Every image of `caption` -> [N, 3, size, size] float64: the distinct images among `draws`
    random ones (N = 400 at 32 px; 6000 draws miss one of them with probability below 1e-3)."""
    x, _ = data.shapes_batch(draws, frames=1, size=size, generator=0, captions=[caption] * draws)
    images = torch.unique(x[:, :, 0].double(), dim=0)
    d = round(size * data.OBJECT_FRACTION)
    expected = (size - 2 * data.MARGIN - d + 1) ** 2  # whole-pixel corner positions
    if len(images) != expected:
        raise RuntimeError(f"found {len(images)} of the {expected} images of {caption!r}; raise draws")
    return images


def oracle_velocity(sets, windows):
    """velocity(x, k, t) for pf.sample: the posterior mean of Eq. 11's target given x_t, for a
    batch whose row b has the candidate images sets[b] [N_b, C, H, W] (full resolution)."""
    per_stage = {}  # k -> per row, its candidates' clean (end, start) at stage k's resolution

    def candidates(k):
        if k not in per_stage:
            # clean ends, [N, C, h, w]
            X = [pf.down(S, k) for S in sets]
            # starts
            U = [pf.up(pf.down(x)) if windows[k][0] > 0 else torch.zeros_like(x) for x in X]
            per_stage[k] = list(zip(X, U))
        return per_stage[k]

    def velocity(x, k, t):
        s, e = windows[k]
        d = t * (1 - e) + (1 - t) * (1 - s)
        out = []
        for b, (X, U) in enumerate(candidates(k)):
            mean = t * e * X + (1 - t) * s * U  # Eqs. 6, 9-10 without the noise
            # = d n for each candidate
            r = x[b:b + 1].double() - mean
            # posterior over X
            weights = torch.softmax(-(r.flatten(1) ** 2).sum(1) / (2 * d * d), 0)
            v = e * X - s * U + (s - e) * r / d  # Eq. 11 per candidate
            out.append((weights.view(-1, 1, 1, 1) * v).sum(0))
        return torch.stack(out).to(x.dtype)
    return velocity


def score_images(velocity, captions, K, steps, size=32, seed=0):
    """Sample one image per caption with `velocity` and score colour and shape (toy/evaluate.py)."""
    windows = pf.stage_windows(K)
    x = pf.sample(velocity, (len(captions), 3, size, size), windows, steps,
                  torch.Generator().manual_seed(seed))
    scores = evaluate.score_shapes(x.clamp(-1, 1)[:, :, None].repeat(1, 1, 2, 1, 1), captions)
    return scores, x


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    captions = data.SHAPE_CAPTIONS
    steps, guidance = int(opts.get("steps", 10)), float(opts.get("guidance", 1.0))
    sets = [caption_images(c) for c in captions]
    if "ckpt" not in opts:
        K = int(opts.get("K", 3))
        scores, _ = score_images(oracle_velocity(sets, pf.stage_windows(K)), captions, K, steps)
        print(f"oracle, K={K}, {steps} steps per stage: colour {scores['colour']:.3f} shape {scores['shape']:.3f}")
        return
    import sample  # checkpoint loading and the model's velocity
    net, cfg, vae = sample.load(opts["ckpt"])
    if vae is not None:
        sys.exit("error: toy/oracle.py compares pixel-space checkpoints only")
    K = cfg["K"]
    windows = pf.stage_windows(K)
    oracle = oracle_velocity(sets, windows)
    # first frames: no history
    model = sample.model_velocity(net, cfg, captions, guidance, guidance)
    print(f"{len(captions)} captions, {steps} Euler steps per stage, guidance {guidance}; stage 0 = full resolution")
    for stages in [(k,) for k in range(K)] + [tuple(range(K))]:
        mixed = lambda x, k, t: model([], x, k, t) if k in stages else oracle(x, k, t)  # noqa: E731
        with torch.no_grad():
            scores, _ = score_images(mixed, captions, K, steps)
        where = "all stages (no oracle)" if len(stages) == K else f"stage {stages[0]} only (oracle elsewhere)"
        print(f"model at {where:<31}: colour {scores['colour']:.3f} shape {scores['shape']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
