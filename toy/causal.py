"""
App. C.2 / Fig. 11 at laptop scale: blockwise-causal against bidirectional attention in the
autoregressive temporal pyramid. The paper's ablation: with bidirectional attention over
[history | current] (history tokens also see the frame being generated), subjects change shape
and colour over time. Both arms train the quick start's recipe (shapes text-to-video, 9 frames on
the toy VAE's latents, K = 2, batch 48) with the same data set, seed and steps; the only
difference is train.py's --causal. Every --every steps both sample the captions (--seeds) and are
scored (toy/evaluate.py): the per-frame colour and shape kept over the frames (each frame
classified on its own), size kept, consistency (all three), direction; plus the seconds sampling
takes (no KV cache here, so causality saves no compute at sampling: both run the same tokens).

    python toy/causal.py [--every=200] [--seeds=1,2] [--key=value ...]   # train.py settings
    python toy/causal.py --quick                                         # seconds (tests)

Budget: 1000 steps of 48 clips per arm (48,000 clips, the quick start's tokens a step), 5
evaluations of 2 x 48 videos per arm; about 17 minutes on an idle 2-core CPU, the shared VAE
included (out/experiments/vae, about 3.5 of them, trained by the first experiment run; the
estimate is in NOTES-experiments.md). Prints the scores along the way, then a table of the final
scores, training seconds a step and sampling seconds per seed (48 videos); writes
out/experiments/causal/causal.png (consistency against steps, the final samples' first and last
frames).
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toy import experiment as ex  # noqa: E402

OWN = dict(every=200, seeds="1,2", captions=48)
SETTINGS = dict(max_steps=1000)
QUICK = dict(max_steps=4, frames=5)
KEYS = ("colour_kept", "shape_kept", "size_kept", "consistency", "direction", "colour", "shape")


def main(argv):
    run = ex.setup(argv, "causal", OWN, SETTINGS, QUICK)
    arms = {"blockwise-causal": dataclasses.replace(run.cfg, causal=True),
            "bidirectional": dataclasses.replace(run.cfg, causal=False)}
    curves = ex.run_arms(arms, run.out, run.opts["every"], run.vae, run.captions, run.seeds, run.quick)
    print(f"\nafter {run.cfg.max_steps} steps each; sampling: {len(run.captions)} videos of {run.cfg.frames} frames")
    ex.print_table(["attention", *KEYS, "train s/step", "sample s"],
                   [(n, *(c["scores"][-1][k] for k in KEYS), c["step_seconds"], c["sample_seconds"])
                    for n, c in curves.items()])
    ex.plot(os.path.join(run.out, "causal.png"), [
        ("curves", "consistency vs steps", "steps", "consistency",
         ex.series(curves, "steps", "consistency")),
        *[("image", f"{n}: first | last frame", ex.thumbnails(c["videos"])) for n, c in curves.items()]],
        title="Fig. 11 analogue: blockwise-causal vs bidirectional attention (shapes videos)")
    return curves


if __name__ == "__main__":
    main(sys.argv[1:])
