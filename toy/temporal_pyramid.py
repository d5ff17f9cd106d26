"""
Sec. 4.4 / Fig. 8 at laptop scale: the temporal pyramid (autoregressive training on one frame at a
time, its history compressed as Eq. 16) against full-sequence video flow matching (the whole clip
noisy at one t, bidirectional attention, K = 1, every frame in the loss: train.py --full_sequence).
Both train the shipped quick start's recipe (shapes text-to-video on the shipped toy VAE's 8 x 8 x 4
latents, patch 2, the MM-DiT of width 128, a quarter of the clips images, cosine decay) with the
same data set, seed, batch (48) and steps, at 17 frames = 9 latent frames rather than the quick
start's 9: the full sequence then costs 144 tokens a clip against the pyramid's 35 on average
(ratio 0.24; at 9 frames 0.33; the paper's 10 s clip: 0.13), closer to the paper's trade. The
pyramid is the quick start (K = 2, stages 1:2, 10 + 10 Euler steps for the first frame, 5 + 5 for
later ones); the full sequence samples the clip with pf.sample at K = 1 in 20 Euler steps. The arms
train in alternating chunks of --every steps. Every --every steps both sample the captions
(--seeds) and are scored by toy/evaluate.py.

    python toy/temporal_pyramid.py [--every=100] [--seeds=1] [--key=value ...]   # train.py settings
    python toy/temporal_pyramid.py --quick                                        # under a minute (tests)

Budget: 800 steps of 48 clips per arm (38,400 clips), 8 evaluations of 48 videos per arm
(about 17 minutes on an idle 2-core CPU, toy/README.md).
Prints the scores along the way, then a table: tokens per training sample of a video clip (the
mean over AR positions and stages for the pyramid), seconds per training step measured in this
run, and the scores (direction, size kept, consistency, colour, shape, pixel Frechet distance) at
equal steps (both at the end) and at equal wall time (the full sequence's last evaluation within
the pyramid's training time). Writes out/experiments/temporal_pyramid/temporal_pyramid.png. Ends with
    verdict: agrees|disagrees|inconclusive: consistency at equal training time, pyramid / full sequence: A / B
(agrees: the pyramid's is higher by at least 0.05; disagrees: lower by as much).
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
from toy import experiment as ex  # noqa: E402

OWN = dict(every=100, seeds="1", captions=48)
# the shipped recipe (its VAE, cosine decay), at 17 frames
SETTINGS = dict(vae_ckpt=config.QUICK_START_VAE, lr_decay="cosine", frames=17, max_steps=800)
MARGIN = 0.05
FULL = dict(full_sequence=True, K=1, causal=False, stage_ratio="1", sample_steps="20", sample_steps_later="20")
QUICK = dict(max_steps=4, frames=5)
KEYS = ("direction", "size_kept", "consistency", "colour", "shape", "frechet")


def main(argv):
    run = ex.setup(argv, "temporal_pyramid", OWN, SETTINGS, QUICK)
    arms = {f"temporal pyramid (K = {run.cfg.K})": run.cfg,
            "full sequence": dataclasses.replace(run.cfg, **FULL)}
    curves = ex.run_arms(arms, run.out, run.opts["every"], run.vae, run.captions, run.seeds, run.quick,
                         alternate=True)
    (pyr_name, pyr), (full_name, full) = curves.items()
    tokens = {n: ex.tokens_per_clip(cfg) for n, cfg in arms.items()}
    equal_time = pyr["seconds"][-1]
    print(f"\nequal steps: both after {pyr['steps'][-1]} steps")
    ex.print_table(["arm", "tokens/clip", "s/step", "train s", *KEYS],
                   [(n, f"{tokens[n]:.1f}", c["step_seconds"], f"{c['seconds'][-1]:.0f}",
                     *(c["scores"][-1][k] for k in KEYS)) for n, c in curves.items()])
    steps_then = [s for s, t in zip(full["steps"], full["seconds"]) if t <= equal_time]
    print(f"\nequal wall time: {equal_time:.0f} s of training (the pyramid's all, the full sequence's "
          f"last evaluation within it: step {steps_then[-1] if steps_then else '-'})")
    ex.print_table(["arm", "steps", *KEYS],
                   [(pyr_name, pyr["steps"][-1], *(pyr["scores"][-1][k] for k in KEYS)),
                    (full_name, steps_then[-1] if steps_then else None,
                     *(ex.value_at(full, k, equal_time, "seconds") for k in KEYS))])
    ex.plot(os.path.join(run.out, "temporal_pyramid.png"), [
        ("curves", "consistency vs steps", "steps", "consistency",
         ex.series(curves, "steps", "consistency")),
        ("curves", "consistency vs training time", "seconds", "consistency",
         ex.series(curves, "seconds", "consistency")),
        ("curves", "direction vs training time", "seconds", "direction accuracy",
         ex.series(curves, "seconds", "direction")),
        *[("image", f"{n}: first | last frame", ex.thumbnails(c["videos"])) for n, c in curves.items()]],
        title="Fig. 8 analogue: temporal pyramid vs full-sequence training (shapes videos)")
    a, b = pyr["scores"][-1]["consistency"], ex.value_at(full, "consistency", equal_time, "seconds")
    if b is None:
        verdict, b = "agrees", float("nan")  # the full sequence had no evaluation within the pyramid's time
    else:
        verdict = "agrees" if a >= b + MARGIN else "disagrees" if b >= a + MARGIN else "inconclusive"
    print(f"verdict: {verdict}: consistency at equal training time, pyramid / full sequence: {a:.3f} / {b:.3f}")
    return curves, tokens


if __name__ == "__main__":
    main(sys.argv[1:])
