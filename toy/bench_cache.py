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
    python toy/bench_cache.py [--quick] [--batch=1] [--depth=3] [--frames=4,8,16,32]
    python toy/bench_cache.py --profile      # where the time goes: the ops of one 6-frame run each way

--batch samples that many videos at once (sample.py batches its prompts): a cached step runs few
tokens, and on a CPU a matrix product of few rows costs the reading of its weights, not its
FLOPs; more videos a call give it the rows. --profile prints, for one run each way, the share of
the CPU time in the ops that take most of it, and the matrix products' count and mean time.
"""
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dit  # noqa: E402
import text_to_video  # noqa: E402
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
# checks that it runs
QUICK = dict(size="toy", width=32, heads=2, depth=1, latent=4, channels=4, K=2, steps=(1, 1))


USAGE = "python toy/bench_cache.py [--quick] [--profile] [--batch=N] [--depth=N] [--frames=4,8,16,32]"


def settings(argv):
    """(settings, options) from the command line: --quick picks QUICK, then --batch, --depth, --frames."""
    quick = "--quick" in argv
    s = dict(QUICK if quick else FULL, batch=1)
    opts = dict(profile="--profile" in argv, frames=FRAMES[:-1] if quick else FRAMES)
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        if arg in ("--quick", "--profile"):
            continue
        try:
            if key in ("batch", "depth") and eq and int(value) >= 1:
                s[key] = int(value)
                continue
            if key == "frames" and eq and all(int(v) >= 1 for v in value.split(",")):
                opts["frames"] = tuple(int(v) for v in value.split(","))
                continue
        except ValueError:
            pass
        raise SystemExit(f"error: unknown or bad option {arg!r}; usage: {USAGE}")
    return s, opts


def run(net, frames, s, cache):
    """(seconds, video, most cache bytes held, seconds spent filling caches) of one sampling run."""
    captions = [" ".join(f"word{j}" for j in range(TEXT_TOKENS))] * s["batch"]
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
    video = pf.sample_video(velocity, (s["batch"], s["channels"], s["latent"], s["latent"]), frames, pf.stage_windows(s["K"]),
                            s["steps"][0], s["steps"][1], generator=torch.Generator().manual_seed(0),
                            condition=condition if cache else None)
    return time.perf_counter() - t0, video, stats["bytes"], stats["fill"]


def profile(net, s, frames=6):
    """torch.profiler over one run each way: the ops with the most CPU time of their own, and the
    matrix products (aten::addmm, the linear layers): how many, and their mean time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    for cache in (False, True):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds = run(net, frames, s, cache)[0]
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops)
        mm = next(e for e in ops if e.key == "aten::addmm")
        print(f"{'cached' if cache else 'uncached':>8s}, {frames} frames: {seconds:.2f}s; "
              + ", ".join(f"{e.key} {e.self_cpu_time_total / total:.0%}" for e in ops[:4])
              + f"; {mm.count} matrix products, {mm.self_cpu_time_total / mm.count / 1e3:.2f} ms each")


def main(argv):
    s, opts = settings(argv)
    cfg = dataclasses.replace(dit.SIZES[s["size"]], in_channels=s["channels"], width=s["width"], heads=s["heads"],
                              depth=s["depth"], per_frame_attention=True)
    torch.manual_seed(0)
    net = text_to_video.TextToVideo(cfg, max_len=TEXT_TOKENS).eval()
    with torch.no_grad():  # off adaLN-Zero's identity, so the max |diff| column checks something
        for p in net.parameters():
            p.add_(WEIGHT_NOISE * torch.randn_like(p))
    print(f"MM-DiT {s['size']} (width {cfg.width}, depth {cfg.depth}), latents {s['channels']}x{s['latent']}x"
          f"{s['latent']}, patch {cfg.patch_size}, K = {s['K']}, Euler steps a stage {s['steps'][0]} (first frame) "
          f"and {s['steps'][1]}, CFG, batch {s['batch']}, {TEXT_TOKENS} text tokens, {torch.get_num_threads()} threads")
    if opts["profile"]:
        return profile(net, s)
    print(f"{'frames':>6s} {'uncached':>9s} {'cached':>8s} {'ratio':>6s} {'filling':>8s} {'cache':>9s} "
          f"{'max |diff|':>10s}")
    ratios = {}
    for frames in opts["frames"]:  # --quick stops at 16 frames
        t_plain, v_plain, _, _ = run(net, frames, s, cache=False)
        t_cached, v_cached, nbytes, fill = run(net, frames, s, cache=True)
        ratios[frames] = t_cached / t_plain
        diff = (v_cached - v_plain).abs().max().item()
        print(f"{frames:6d} {t_plain:8.2f}s {t_cached:7.2f}s {ratios[frames]:6.3f} {fill / t_cached:7.0%} "
              f"{nbytes / 2 ** 20:6.2f} MB {diff:10.1e}")
    if 16 in ratios:
        print(f"sampling time ratio, cached / uncached at 16 frames: {ratios[16]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
