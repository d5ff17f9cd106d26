"""
Sec. 4.4 / Fig. 7 at laptop scale: does the spatial pyramid converge faster than standard flow
matching? The same MM-DiT (the quick start's: width 128, 4 layers, 4 heads) is trained twice on
text-to-image shapes (one-frame clips, the 48 captions) on the latents of the quick start's toy VAE
(8 x 8 x 4, patch 1: 64 tokens at full resolution), with the same data set, seed, batch and steps:
as a K = 3 pyramid (8, 4, 2 latent pixels a side; stages 1:2:1 in every batch, 10 Euler steps per
stage) and as single-stage flow matching at full resolution (K = 1, 30 Euler steps: the same
model calls per sample). Every --every steps both are sampled on the captions (--seeds) and
scored: colour and shape accuracy (toy/evaluate.py) and a Frechet distance of 4 x 4 colour
thumbnails to real images (toy/experiment.pixel_frechet; lower is better).

    python toy/spatial_pyramid.py [--every=150] [--seeds=1,2] [--key=value ...]   # train.py settings
    python toy/spatial_pyramid.py --equal_tokens=true    # the paper's setting: equal tokens a batch
    python toy/spatial_pyramid.py --quick                                          # seconds (tests)

By default both arms take the same batch (the pyramid's steps are then cheaper: the wall-time
axis shows the saving). The paper compares at equal tokens per batch, so its pyramid sees more
images a step: --equal_tokens=true grows the pyramid's batch to 60 images (about 1,500 tokens,
as the baseline's 24 x 64), at about the baseline's cost a step (about 2 more minutes).

Budget: 1200 steps of 24 images per arm (28,800 images; the baseline sees 64 tokens an image, the
pyramid (1 x 4 + 2 x 16 + 1 x 64) / 4 = 25 on average), 8 evaluations of 96 images per arm; about
17 minutes on an idle 2-core CPU, the shared VAE included (out/experiments/vae, about 3.5 of
them, trained by the first experiment run; the estimate is in NOTES-experiments.md).
Prints the scores along the way, then a table: each score's final value in both arms and the
steps and training seconds each arm needs to reach the baseline's final value, with their ratios
(baseline / pyramid: above 1 means the pyramid gets there faster; the paper reports about 3x in
FID). Writes out/experiments/spatial_pyramid/spatial_pyramid.png (the curves against steps and
against seconds, the final samples of both).
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toy import experiment as ex  # noqa: E402

OWN = dict(every=150, seeds="1,2", captions=48, equal_tokens=False)
SETTINGS = dict(frames=1, image_ratio=1.0,  # text-to-image: every clip is one frame
                patch=1,                   # 64 tokens of 8 x 8 latents: room for three levels
                # half the quick start's batch: steps matter more (toy/README.md)
                batch_size=24, max_steps=1200,
                data_pool=960)
PYRAMID = dict(K=3, stage_ratio="1,2,1", sample_steps="10,10,10", sample_steps_later="10,10,10")
# as many model calls
SINGLE = dict(K=1, stage_ratio="1", sample_steps="30", sample_steps_later="30")
QUICK = dict(max_steps=4)
METRICS = (("frechet", False), ("shape", True), ("colour", True))  # (score, higher is better)


def arms(cfg, equal_tokens=False):
    """The baseline first: the table measures the pyramid against its final values. With
    equal_tokens the pyramid's batch grows until a step holds about the baseline's tokens (the
    paper's setting), in whole groups of its stage ratio."""
    single, pyramid = dataclasses.replace(cfg, **SINGLE), dataclasses.replace(cfg, **PYRAMID)
    if equal_tokens:
        groups = sum(int(r) for r in pyramid.stage_ratio.split(","))
        scale = ex.tokens_per_clip(single) / ex.tokens_per_clip(pyramid)
        pyramid = dataclasses.replace(pyramid, batch_size=groups * round(cfg.batch_size * scale / groups))
    return {"single stage (K = 1)": single, f"pyramid (K = {PYRAMID['K']})": pyramid}


def main(argv):
    run = ex.setup(argv, "spatial_pyramid", OWN, SETTINGS, QUICK)
    curves = ex.run_arms(arms(run.cfg, run.opts["equal_tokens"]), run.out, run.opts["every"], run.vae, run.captions, run.seeds, run.quick)
    report(curves, run.out)
    return curves


def report(curves, out):
    (base_name, base), (pyr_name, pyr) = curves.items()
    print(f"\nsteps {base['steps'][-1]} per arm; seconds a training step: {base_name} "
          f"{base['step_seconds']:.3f}, {pyr_name} {pyr['step_seconds']:.3f}")
    rows = []
    for key, higher in METRICS:
        target = base["scores"][-1][key]
        reach = {n: (ex.first_reaching(c, key, target, higher), ex.first_reaching(c, key, target, higher, "seconds"))
                 for n, c in curves.items()}
        (b_steps, b_sec), (p_steps, p_sec) = reach[base_name], reach[pyr_name]
        rows.append((key, target, pyr["scores"][-1][key], b_steps, p_steps,
                     b_steps / p_steps if p_steps else None, b_sec, p_sec, b_sec / p_sec if p_sec else None))
    ex.print_table(["score", "single final", "pyramid final", "single steps", "pyramid steps", "steps ratio",
                    "single s", "pyramid s", "time ratio"], rows)
    print("(steps and seconds to reach the single stage's final value; ratio = single / pyramid, "
          "'-': never reached)")
    ex.plot(os.path.join(out, "spatial_pyramid.png"), [
        ("curves", "Frechet distance (thumbnails) vs steps", "steps", "Frechet distance",
         ex.series(curves, "steps", "frechet")),
        ("curves", "Frechet distance vs training time", "seconds", "Frechet distance",
         ex.series(curves, "seconds", "frechet")),
        ("curves", "shape accuracy vs steps", "steps", "shape accuracy",
         ex.series(curves, "steps", "shape")),
        *[("image", f"{n}: final samples", ex.thumbnails(c["videos"])) for n, c in curves.items()]],
        title="Fig. 7 analogue: spatial pyramid vs single-stage flow matching (text-to-image shapes)")


if __name__ == "__main__":
    main(sys.argv[1:])
