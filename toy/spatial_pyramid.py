"""
Sec. 4.4 / Fig. 7 at laptop scale: does the spatial pyramid reach a score with less training
compute than standard flow matching? The same MM-DiT (the quick start's: width 128, 4 layers, 4
heads) is trained twice on text-to-image shapes at 64 px (one-frame clips of the 48 captions) on
the latents of the shipped toy VAE (16 x 16 x 4, patch 2: 64 tokens at full resolution, the
object about 5 latents across), with the same data set and seed:
- as a K = 3 pyramid: 64, 16 and 4 tokens (16, 8, 4 latents a side), the stages 1:1:1 in every
  batch (the paper samples them uniformly); sampled with 10, 10 and 15 Euler steps;
- as single-stage flow matching at full resolution (K = 1), 30 Euler steps: the full stage's step
  density (steps per unit of t) is the pyramid's (15 over [0.5, 1]).
The paper's setting by default: equal tokens a step, text tokens counted (5 a caption), so the
pyramid sees more images a step (--equal_tokens=false: equal images). The arms are trained in
alternating chunks of --every steps (one at a time) so a host whose speed drifts slows both alike.
Every --every steps both are sampled on the captions (--seeds) and scored: shape accuracy (chance
1/3), colour accuracy (chance 1/4), and a Frechet distance over 10 blob features a sample (area,
centroid, overlap with four shape templates, mean colour: experiment.blob_features) against 192
real images (4 per caption, 19x the features). The x-axis is the blocks' analytic training FLOPs
(experiment.train_flops), then training seconds.

    python toy/spatial_pyramid.py [--every=100] [--seeds=1] [--key=value ...]   # train.py settings
    python toy/spatial_pyramid.py --quick                                         # under a minute (tests)

Budget: 900 steps a arm (the single stage 24 images of 69 tokens a step, the pyramid 51 images
of 69, 21 and 9 tokens), 10 evaluations of 48 images a arm. First it checks that the VAE's
reconstructions of 64 px images score 1.0 (else nothing the models do can). A validity rule: the
single stage must reach shape >= 0.6, else the run is too short to say anything. Prints the scores
along the way, a table, and ends with the line
    verdict: agrees|disagrees|inconclusive: FLOPs to reach the single stage's final shape, pyramid / single: R
(agrees: R < 1). Writes out/experiments/spatial_pyramid/spatial_pyramid.png.
"""
import dataclasses
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from toy import data, evaluate  # noqa: E402
from toy import experiment as ex  # noqa: E402

OWN = dict(every=100, seeds="1", captions=48, equal_tokens=True)
SETTINGS = dict(frames=1, image_ratio=1.0,       # text-to-image: every clip is one frame
                size=64, vae_ckpt=config.QUICK_START_VAE,  # 16 x 16 x 4 latents
                patch=2, batch_size=24, max_steps=900, data_pool=960)
PYRAMID = dict(K=3, stage_ratio="1,1,1", sample_steps="10,10,15", sample_steps_later="10,10,15")
# the full stage's density: 15 steps over [0.5, 1]
SINGLE = dict(K=1, stage_ratio="1", sample_steps="30", sample_steps_later="30")
QUICK = dict(max_steps=4, data_pool=12, batch_size=6)
METRICS = (("shape", True), ("colour", True), ("frechet", False))  # (score, higher is better)
CHANCE = dict(shape=1 / len(data.SHAPES), colour=1 / len(data.COLOURS))
VALID_SHAPE = 0.6  # the single stage's final shape accuracy below which the run is too short
REAL_PER_CAPTION = 4


def arms(cfg, equal_tokens=True):
    """The baseline first. With equal_tokens the pyramid's batch grows, in whole groups of its
    stage ratio, until a step holds about the baseline's tokens, text tokens included."""
    single, pyramid = dataclasses.replace(cfg, **SINGLE), dataclasses.replace(cfg, **PYRAMID)
    if equal_tokens:
        text = max(len(c.split()) for c in data.SHAPE_CAPTIONS)
        side = cfg.size // 4 // cfg.patch  # tokens a side at full resolution
        group = sum((side >> k) ** 2 + text for k in range(PYRAMID["K"]))  # one image per stage
        pyramid = dataclasses.replace(pyramid, batch_size=3 * round(cfg.batch_size * (side ** 2 + text) / group))
    return {"single stage (K = 1)": single, f"pyramid (K = {PYRAMID['K']})": pyramid}


def scorer(captions, size):
    """score_fn of the runs: shape and colour accuracy and the blob Frechet distance to real images."""
    real = data.shapes_batch(REAL_PER_CAPTION * len(captions), frames=1, size=size, generator=0,
                             captions=list(captions) * REAL_PER_CAPTION)[0]
    real_feats = ex.blob_features(real)

    def score(videos, captions):
        scores = evaluate.score_shapes(videos, captions)
        return dict(shape=scores["shape"], colour=scores["colour"],
                    frechet=evaluate.frechet_distance(ex.blob_features(videos), real_feats))
    return score


def check_vae(vae, captions, size):
    """The VAE's reconstructions of real images of the captions score (shape, colour)."""
    import torch
    real = data.shapes_batch(len(captions), frames=1, size=size, generator=1, captions=captions)[0]
    with torch.no_grad():
        recon = vae.decode(vae.encode(real)).clamp(-1, 1)
    scores = evaluate.score_shapes(recon, captions)
    return scores["shape"], scores["colour"]


def main(argv):
    run = ex.setup(argv, "spatial_pyramid", OWN, SETTINGS, QUICK)
    shape, colour = check_vae(run.vae, run.captions, run.cfg.size)
    print(f"the VAE's reconstructions of {len(run.captions)} real {run.cfg.size} px images: shape {shape:.3f}, "
          f"colour {colour:.3f}")
    curves = ex.run_arms(arms(run.cfg, run.opts["equal_tokens"]), run.out, run.opts["every"], run.vae, run.captions,
                         run.seeds, run.quick, score_fn=scorer(run.captions, run.cfg.size), alternate=True)
    report(curves, run.out)
    return curves


def report(curves, out):
    (base_name, base), (pyr_name, pyr) = curves.items()
    gflops = [c["flops"][0] / c["steps"][0] / 1e9 for c in (base, pyr)]
    print(f"\nsteps {base['steps'][-1]} per arm; training seconds a step: {base_name} {base['step_seconds']:.3f}, "
          f"{pyr_name} {pyr['step_seconds']:.3f}; GFLOPs a step (analytic): {gflops[0]:.2f}, {gflops[1]:.2f}")
    rows, reach = [], {}
    for key, higher in METRICS:
        target = base["scores"][-1][key]
        b_f, p_f = (ex.first_reaching(c, key, target, higher, "flops") for c in (base, pyr))
        b_s, p_s = (ex.first_reaching(c, key, target, higher, "seconds") for c in (base, pyr))
        reach[key] = (b_f, p_f)
        rows.append((key, CHANCE.get(key, "-"), target, pyr["scores"][-1][key], b_f / 1e12, p_f / 1e12 if p_f else None,
                     p_f / b_f if p_f else None, b_s, p_s, p_s / b_s if p_s else None))
    ex.print_table(["score", "chance", "single final", "pyramid final", "single TFLOPs", "pyramid TFLOPs",
                    "FLOPs ratio", "single s", "pyramid s", "time ratio"], rows)
    print("(training FLOPs and seconds to reach the single stage's final value; ratio = pyramid / single, "
          "'-': never reached)")
    ex.plot(os.path.join(out, "spatial_pyramid.png"), [
        ("curves", "shape accuracy vs training FLOPs", "flops", "shape accuracy", ex.series(curves, "flops", "shape")),
        ("curves", "shape accuracy vs training time", "seconds", "shape accuracy",
         ex.series(curves, "seconds", "shape")),
        ("curves", "blob Frechet distance vs training FLOPs", "flops", "Frechet distance",
         ex.series(curves, "flops", "frechet")),
        *[("image", f"{n}: final samples", ex.thumbnails(c["videos"])) for n, c in curves.items()]],
        title="Fig. 7 analogue: spatial pyramid vs single-stage flow matching (64 px text-to-image shapes)")
    final = base["scores"][-1]["shape"]
    b_f, p_f = reach["shape"]
    ratio = p_f / b_f if p_f else math.inf
    if final < VALID_SHAPE:
        print(f"the single stage's final shape accuracy {final:.3f} is below {VALID_SHAPE}: the run is too short "
              f"to compare (more --max_steps)")
        verdict = "inconclusive"
    else:
        verdict = "agrees" if ratio < 1 else "disagrees"
    print(f"verdict: {verdict}: FLOPs to reach the single stage's final shape, pyramid / single: {ratio:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
