"""Benchmark: autoregressive sampling with the KV cache of the text and history tokens vs without.

Under the blockwise-causal mask (Sec. 3.4) neither the text nor the history tokens see the frame
being generated, and history is modulated with the clean time, so within one stage of one frame
their keys and values are the same at every Euler step: dit.KVCache holds them, computed once per
(frame, stage), and each step runs only the current frame's tokens (sample.HistoryCache, which
also keeps the part of old frames at the lowest level from frame to frame). The release modulates history with the current time step and has to recompute it at every call.

One run times sample.py's sampling loop (pf.sample_video with sample.model_velocity, CFG on, as
sample.py runs it) cached and uncached at 4, 8, 16 and 32 latent frames, on a randomly initialised
model (timing does not depend on the weights), batch 1, and reports the most cache memory held
and the share of the cached time spent filling caches. The uncached model uses per-frame
attention, its faster causal path.

Run from the repository root (10-15 minutes on 2 cores; --quick: a toy size, seconds):
    python toy/bench_cache.py [--quick]
"""
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dit  # noqa: E402
import pyramid_flow as pf  # noqa: E402
import sample  # noqa: E402

FRAMES = (4, 8, 16, 32)       # latent frames per video
TEXT_TOKENS = 32              # caption length in tokens (the toy encoder: one token a word)
WEIGHT_NOISE = 0.02           # added to every initial weight
GUIDANCE = 5.0                # CFG on: both halves in one [2B] batch, as sample.py runs it
# The S MM-DiT's width and heads on 16x16x16 latents (64 tokens a frame), with sample.py's step counts
# (the release's 20 a stage for the first frame, 10 later); 3 of its 12 blocks so that one run fits
# in 15 minutes (estimated from an 8-frame run at depth 1): time is linear in depth, the ratio hardly.
FULL = dict(size="S", width=768, heads=12, depth=3, latent=16, channels=16, K=3,
            steps=(sample.FIRST_FRAME_STEPS, sample.LATER_FRAME_STEPS))
QUICK = dict(size="toy", width=32, heads=2, depth=1, latent=4, channels=4, K=2, steps=(1, 1))  # checks that it runs


def settings(argv):
    if argv not in ([], ["--quick"]):
        raise SystemExit(f"usage: python toy/bench_cache.py [--quick], got {' '.join(argv)}")
    return QUICK if argv else FULL


def run(net, frames, s, cache):
    """(seconds, video, most cache bytes held, seconds spent filling caches) of one sampling run."""
    captions = [" ".join(f"word{j}" for j in range(TEXT_TOKENS))]
    run_cfg = dict(K=s["K"], prediction="v")
    velocity = sample.model_velocity(net, run_cfg, captions, GUIDANCE, GUIDANCE)
    stats = dict(bytes=0, fill=0.0)
    make = sample.HistoryCache(net, run_cfg, captions, GUIDANCE)

    def condition(history, x, k):
        t0 = time.perf_counter()
        out = make(history, x, k)
        stats["fill"] += time.perf_counter() - t0
        stats["bytes"] = max(stats["bytes"], make.nbytes())
        return out
    t0 = time.perf_counter()
    video = pf.sample_video(velocity, (1, s["channels"], s["latent"], s["latent"]), frames, pf.stage_windows(s["K"]),
                            s["steps"][0], s["steps"][1], generator=torch.Generator().manual_seed(0),
                            condition=condition if cache else None)
    return time.perf_counter() - t0, video, stats["bytes"], stats["fill"]


def main(argv):
    s = settings(argv)
    cfg = dataclasses.replace(dit.SIZES[s["size"]], in_channels=s["channels"], width=s["width"], heads=s["heads"],
                              depth=s["depth"], per_frame_attention=True)
    torch.manual_seed(0)
    net = dit.TextToVideo(cfg, max_len=TEXT_TOKENS).eval()
    with torch.no_grad():  # off adaLN-Zero's identity, so the max |diff| column checks something
        for p in net.parameters():
            p.add_(WEIGHT_NOISE * torch.randn_like(p))
    print(f"MM-DiT {s['size']} (width {cfg.width}, depth {cfg.depth}), latents {s['channels']}x{s['latent']}x"
          f"{s['latent']}, patch {cfg.patch_size}, K = {s['K']}, Euler steps a stage {s['steps'][0]} (first frame) "
          f"and {s['steps'][1]}, CFG, batch 1, {TEXT_TOKENS} text tokens, {torch.get_num_threads()} threads")
    print(f"{'frames':>6s} {'uncached':>9s} {'cached':>8s} {'ratio':>6s} {'filling':>8s} {'cache':>9s} "
          f"{'max |diff|':>10s}")
    ratios = {}
    for frames in FRAMES if s is FULL else FRAMES[:-1]:  # --quick stops at 16 frames
        t_plain, v_plain, _, _ = run(net, frames, s, cache=False)
        t_cached, v_cached, nbytes, fill = run(net, frames, s, cache=True)
        ratios[frames] = t_cached / t_plain
        diff = (v_cached - v_plain).abs().max().item()
        print(f"{frames:6d} {t_plain:8.2f}s {t_cached:7.2f}s {ratios[frames]:6.3f} {fill / t_cached:7.0%} "
              f"{nbytes / 2 ** 20:6.2f} MB {diff:10.1e}")
    print(f"sampling time ratio, cached / uncached at 16 frames: {ratios[16]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
