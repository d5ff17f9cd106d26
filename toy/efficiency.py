"""
Sec. 3.3 and 4.2: what the pyramids save, counted and measured.

1. The token table (pf.pyramid_tokens, pf.full_sequence_tokens): the tokens the DiT sees to
   train the last latent frame at full resolution with the temporal pyramid, against the full
   sequence, for the paper's 10 s 768p clip (31 latent frames of 96 x 160, patch 2, K = 3:
   15,360 vs 119,040) and the video presets of train.py. The paper's "TN/4^K" is one level off
   from its own 15,360 (the oldest history sits at level K-1: 28 x 240 tokens, not 28 x 60).
2. Measured, in one run on one machine, at a model size where compute rather than Python
   overhead fills a step:
   (a) sampling time of the K = 3 spatial pyramid (pf.sample, STEPS Euler steps a stage at
       16 x 16, 8 x 8 and 4 x 4 latents of 4 channels, patch 1) over a single full-resolution
       stage with the same model calls (K x STEPS steps at 16 x 16). The token count bounds the
       ratio near (1 + 1/4 + 1/16) / 3 = 0.44 (attention, quadratic in tokens, lowers it; a
       call's fixed cost raises it);
   (b) training step time (train.train: batch, forward, backward, AdamW) of the temporal pyramid
       (K = 3, stages 1:2:1, a random AR position per group) over the full sequence
       (--full_sequence) on 16-frame pixel clips of 32 x 32 (patch 2: 256 tokens a frame,
       4,096 for the clip), both video only, from a data set made once;
   (c) training step time (the groups, VideoLoss's one pass of the network, backward, train.py's
       fused AdamW) of the K = 3 spatial pyramid over 16, 8 and 4 latents a side of 4 channels
       (patch 2: 64, 16 and 4 tokens; stages 1:1:1) over the single stage on the same 48 images, the quick start's
       MM-DiT (width 128, depth 4), the best of 7 steps of each, alternated; and the blocks'
       analytic FLOPs ratio (toy/experiment.step_flops, text tokens counted): 0.469.

    python toy/efficiency.py [--threads=N]   # about 70 seconds on an idle 2-core CPU (toy/README.md)
    python toy/efficiency.py --quick         # seconds (tests): tiny sizes, the same code

Budget: (a) a 4-layer MM-DiT of width 384, batch 8, 3 x 6 model calls per sample, the best of 3
timed runs of each, alternated (a drifting machine slows both alike); (b) a 2-layer MM-DiT of
width 192, batch 4, 2 warm-up and 6 (full sequence) or 24 (pyramid) timed steps, one arm after the
other. Prints the token table, the measured times, and ends with exactly three lines:
    sampling time ratio, spatial pyramid / single stage: R
    training step time ratio, temporal pyramid / full sequence: R
    training step time ratio, spatial pyramid / single stage at equal images: R
"""
import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import dit  # noqa: E402
import text_to_video  # noqa: E402
import pyramid_flow as pf  # noqa: E402
import train  # noqa: E402
import vae  # noqa: E402
from toy import data  # noqa: E402
from toy import experiment as ex  # noqa: E402

# 768p, 8x VAE, 241 frames -> 31 latents
PAPER = dict(h=768 // 8, w=1280 // 8, frames=31, patch=2, K=3)
# (a) the sampling benchmark and (b) the training benchmark, full size and --quick
SAMPLING = dict(side=16, channels=4, width=384, depth=4, heads=6, batch=8, steps=6, repeats=3)
SAMPLING_QUICK = dict(side=8, channels=4, width=32, depth=1, heads=1, batch=2, steps=1, repeats=1)
TRAINING = dict(frames=16, size=32, patch=2, width=192, depth=2, heads=3, batch_size=4, warm=2,
                timed_full=6, timed_pyramid=24)
TRAINING_QUICK = dict(frames=4, size=8, patch=1, width=32, depth=1, heads=1, batch_size=4, warm=1,
                      timed_full=2, timed_pyramid=2)

# (c) the spatial experiment's training step: K = 3 over 16/8/4 latents a side, equal images
SPATIAL_TRAINING = dict(side=16, width=128, depth=4, heads=4, batch=48, repeats=7)
SPATIAL_TRAINING_QUICK = dict(side=8, width=32, depth=1, heads=1, batch=6, repeats=1)


def token_table():
    """Rows (setting, latent frame, frames, full sequence, temporal pyramid, pyramid / full)."""
    rows = [("paper, 10 s 768p", f"{PAPER['h']}x{PAPER['w']} p{PAPER['patch']}", PAPER["frames"],
             pf.full_sequence_tokens(PAPER["h"], PAPER["w"], PAPER["frames"], PAPER["patch"]),
             pf.pyramid_tokens(PAPER["h"], PAPER["w"], PAPER["frames"], 0, PAPER["K"], PAPER["patch"]))]
    runs = [(f"preset {name}", config.PRESETS[name]) for name in config.PRESETS if name not in config.PHASES]
    runs += [(f"preset {name} phase {n}", config.preset_settings(name, str(n)))
             for name, phases in config.PHASES.items() for n in range(1, len(phases) + 1)]
    for label, settings in runs:
        cfg = config.Config(**settings)
        if cfg.task != "video" or cfg.frames == 1:  # images: no temporal pyramid
            continue
        # latents of the run's VAE (a toy preset's own, or the extracted ones of real data), else pixels
        latent = cfg.vae_steps or cfg.vae_ckpt or cfg.data not in data.SOURCES
        sizes = vae.VAE_SIZES[cfg.vae_size] if latent else None
        h = cfg.size // (sizes.spatial_factor if sizes else 1)
        w = (cfg.frame_width or cfg.size) // (sizes.spatial_factor if sizes else 1)
        T = 1 + (cfg.frames - 1) // (sizes.temporal_factor if sizes else 1)
        patch = cfg.patch or dit.SIZES[cfg.model].patch_size
        rows.append((f"{label} (K = {cfg.K})", f"{h}x{w} p{patch}", T,
                     pf.full_sequence_tokens(h, w, T, patch), pf.pyramid_tokens(h, w, T, 0, cfg.K, patch)))
    return [(*r, r[4] / r[3]) for r in rows]


def paper_formula_tokens():
    """The count with the oldest history at level K (the paper's "TN/4^K"), for the note."""
    # tokens of a full-resolution frame
    h, w = PAPER["h"] // PAPER["patch"], PAPER["w"] // PAPER["patch"]
    level = lambda lv: (h // 2 ** lv) * (w // 2 ** lv)  # noqa: E731
    return level(0) + level(0) + level(1) + (PAPER["frames"] - 3) * level(PAPER["K"])


def time_pair(fa, fb, repeats):
    """The best of `repeats` timed calls of fa and of fb, alternated (a machine whose speed drifts
    then slows both alike), after one untimed warm-up call of each."""
    fa(), fb()
    times = ([], [])
    for _ in range(repeats):
        for fn, seen in zip((fa, fb), times):
            t0 = time.perf_counter()
            fn()
            seen.append(time.perf_counter() - t0)
    return min(times[0]), min(times[1])


def sampling_ratio(s):
    """(a): seconds of pf.sample for the K = 3 pyramid and the single stage, same model calls."""
    torch.manual_seed(0)
    net = text_to_video.TextToVideo(dit.DiTConfig(in_channels=s["channels"], patch_size=1, width=s["width"], depth=s["depth"],
                                        heads=s["heads"], text_dim=128, pooled_dim=128)).eval()
    captions = ["a red circle moving left"] * s["batch"]
    shape = (s["batch"], s["channels"], s["side"], s["side"])

    def run(K, steps):
        windows = pf.stage_windows(K)

        def velocity(x, k, t):
            return net([x], captions, torch.full((s["batch"],), pf.model_time(k, t, windows)))
        pf.sample(velocity, shape, windows, steps, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return time_pair(lambda: run(3, s["steps"]), lambda: run(1, 3 * s["steps"]), s["repeats"])


def step_seconds(cfg, warm):
    """Mean seconds of a training step of train.train after `warm` steps (timed between steps)."""
    stamps = []
    train.train(cfg, quiet=True, on_step=lambda step, ema: stamps.append(time.perf_counter()))
    return statistics.mean(b - a for a, b in zip(stamps[warm - 1:], stamps[warm:]))


def training_ratio(s, out):
    """(b): (pyramid seconds a step, full sequence seconds a step, their configs)."""
    base = dataclasses.replace(
        config.parse_args(["--preset=tiny"]), vae_ckpt="", vae_steps=0, data_pool=4 * s["batch_size"], frames=s["frames"],
        size=s["size"], patch=s["patch"], width=s["width"], depth=s["depth"], heads=s["heads"],
        batch_size=s["batch_size"], image_ratio=0.0, eval_captions=0, overwrite=True, log_every=10 ** 6,
        warmup_steps=1, K=3, stage_ratio="1,2,1", sample_steps="1,1,1", sample_steps_later="1,1,1")
    pyramid = dataclasses.replace(base, out_dir=os.path.join(out, "pyramid"), max_steps=s["warm"] + s["timed_pyramid"])
    full = dataclasses.replace(base, out_dir=os.path.join(out, "full"), max_steps=s["warm"] + s["timed_full"],
                               full_sequence=True, causal=False, K=1, stage_ratio="1", sample_steps="1",
                               sample_steps_later="1")
    return step_seconds(pyramid, s["warm"]), step_seconds(full, s["warm"]), pyramid, full


def spatial_training_ratio(s):
    """(c): seconds of a training step (groups, forward, backward, AdamW) of the K = 3 spatial
    pyramid (stages 1:1:1) and of the single stage on the same images, alternated; and the blocks'
    analytic FLOPs of both (ex.step_flops, the captions' text tokens counted)."""
    side, B, g = s["side"], s["batch"], torch.Generator().manual_seed(0)
    cfg = config.parse_args(["--preset=tiny"])
    net_cfg = dit.DiTConfig(in_channels=4, patch_size=2, width=s["width"], depth=s["depth"], heads=s["heads"],
                            text_dim=128, pooled_dim=128)
    latents = torch.randn(B, 4, 1, side, side, generator=g)   # [B, C, T, h, w]: images
    captions = ex.captions_for(B)
    text = [len(text_to_video.ToyTextEncoder(1, 1).tokenize(c)) for c in captions]

    def arm(K):
        windows, per = pf.stage_windows(K), B // K
        torch.manual_seed(0)
        loss_fn = train.VideoLoss(text_to_video.TextToVideo(net_cfg), windows)
        opt = torch.optim.AdamW(loss_fn.parameters(), lr=1e-4, fused=cfg.fused_adam)  # as train.py
        # stage k takes images k*per .. (k+1)*per - 1
        sequences = [(text[j], (side >> k) ** 2 // 4) for k in range(K) for j in range(k * per, (k + 1) * per)]

        def step():
            groups = []
            for k in range(K):
                group, _ = train.stage_example(latents[k * per:(k + 1) * per], k, dataclasses.replace(cfg, K=K),
                                               windows, g)
                groups.append(dict(group, captions=captions[k * per:(k + 1) * per]))
            loss, _ = loss_fn(groups)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step, ex.step_flops(s["width"], s["depth"], sequences)
    (pyramid, pyr_flops), (single, single_flops) = arm(3), arm(1)
    return (*time_pair(pyramid, single, s["repeats"]), pyr_flops / single_flops)


def main(argv):
    quick = "--quick" in argv
    out = os.path.join(ex.EXPERIMENTS_DIR, "efficiency")
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "--threads" and value.isdigit() and int(value) > 0:
            torch.set_num_threads(int(value))
        elif key == "--out_dir":
            out = value
        elif arg != "--quick":
            raise SystemExit(f"error: unexpected argument {arg!r}; options: --quick --threads=N (N > 0) --out_dir=PATH")
    print("tokens to train the last latent frame at full resolution (temporal pyramid, k = 0) vs the whole clip")
    ex.print_table(["setting", "latent frame", "latent frames", "full sequence", "temporal pyramid", "ratio"],
                   token_table())
    print(f"(the paper's formula TN/4^K, history one level lower, would give {paper_formula_tokens():,} "
          f"for its clip, not 15,360)")

    s = SAMPLING_QUICK if quick else SAMPLING
    pyramid, single = sampling_ratio(s)
    bound = sum(4 ** -k for k in range(3)) / 3
    print(f"\n(a) sampling {s['batch']} latents of {s['side']}x{s['side']}x{s['channels']} (width {s['width']}, "
          f"depth {s['depth']}): pyramid K = 3 x {s['steps']} steps {pyramid:.3f} s, single stage "
          f"{3 * s['steps']} steps {single:.3f} s; token bound {bound:.4f}")

    t = TRAINING_QUICK if quick else TRAINING
    pyr_s, full_s, pyr_cfg, full_cfg = training_ratio(t, out)
    pyr_tok, full_tok = ex.tokens_per_clip(pyr_cfg), ex.tokens_per_clip(full_cfg)
    print(f"(b) training steps of {t['batch_size']} clips of {t['frames']} frames at {t['size']} px, patch "
          f"{t['patch']} (width {t['width']}, depth {t['depth']}): temporal pyramid {pyr_s:.3f} s "
          f"({pyr_tok:.0f} tokens a sample on average), full sequence {full_s:.3f} s ({full_tok} tokens); "
          f"token ratio {pyr_tok / full_tok:.3f}\n")
    c = SPATIAL_TRAINING_QUICK if quick else SPATIAL_TRAINING
    pyr_c, single_c, flops = spatial_training_ratio(c)
    print(f"(c) training steps of {c['batch']} images of {c['side']}x{c['side']}x4 latents, patch 2 (width "
          f"{c['width']}, depth {c['depth']}): spatial pyramid K = 3 (stages 1:1:1, {c['side'] ** 2 // 4}/"
          f"{c['side'] ** 2 // 16}/{c['side'] ** 2 // 64} tokens) {pyr_c:.3f} s, single stage {single_c:.3f} s, "
          f"the best of {c['repeats']} alternated; analytic FLOPs ratio {flops:.3f} (text tokens counted)\n")
    print(f"sampling time ratio, spatial pyramid / single stage: {pyramid / single:.3f}")
    print(f"training step time ratio, temporal pyramid / full sequence: {pyr_s / full_s:.3f}")
    print(f"training step time ratio, spatial pyramid / single stage at equal images: {pyr_c / single_c:.3f}")
    return pyramid / single, pyr_s / full_s, pyr_c / single_c


if __name__ == "__main__":
    main(sys.argv[1:])
