"""The GPU check: what no CPU test shows, in one call of under 8 minutes on one H100 or H200.

    python toy/gpu_check.py [--mfu_iters=5] [--steps=10] [--fp32_tolerance=1e-3] [--bf16_tolerance=0.05]

1. MFU: the paper-size MM-DiT (2.0B, App. B) forward + backward in bf16 autocast, grad checkpointing
   on (as the full preset), at phase 3's longest sample: frame 31 of a 768p clip at full resolution,
   15,360 video tokens (Sec. 4.2) + 128 text tokens; model FLOPs (metrics.py) / time / bf16 peak.
2. train.py --preset=small for --steps steps: tokens/s and MFU from its metrics.jsonl.
3. sample.generate on CUDA against the CPU, same seed, a toy-size model: fp32 must agree within
   --fp32_tolerance (max |diff| of the pixels in [-1, 1]), bf16 autocast within --bf16_tolerance
   (mean |diff|: bf16 keeps 8 bits of mantissa, and 20 Euler steps a stage compound them).
4. The history cache (sample.HistoryCache): sampling time cached / uncached at 16 latent frames on
   toy/bench_cache.py's model (the S MM-DiT's width at depth 3, 16x16 latents, CFG, batch 1).
5. The peak memory; then one summary line. On a machine without CUDA it refuses in one line.
"""
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import dit  # noqa: E402
import metrics  # noqa: E402
import pyramid_flow as pf  # noqa: E402
import sample  # noqa: E402
import text_to_video  # noqa: E402
from common import autocast, key_values, number  # noqa: E402

DEVICE = "cuda"  # what this check is for: it refuses to run without one (main)

DEFAULTS = dict(mfu_iters=5, steps=10, fp32_tolerance=1e-3, bf16_tolerance=0.05)
USAGE = "python toy/gpu_check.py [--mfu_iters=5] [--steps=10] [--fp32_tolerance=1e-3] [--bf16_tolerance=0.05]"
PHASE3 = dict(h=96, w=160, frames=31, text=128)  # 768x1280 under the 8x VAE, 241 frames: 31 latent frames


def parse(argv):
    """The options, typed as their defaults; an unknown one is refused in one line."""
    args = dict(DEFAULTS)
    for key, value in key_values(argv, USAGE):
        if key not in args:
            raise SystemExit(f"error: unknown option --{key}; usage: {USAGE}")
        args[key] = number(key, value, type(DEFAULTS[key]))
        if args[key] <= 0:
            raise SystemExit(f"error: --{key} must be > 0")
    return SimpleNamespace(**args)


def seconds(fn, iters):
    """Mean wall time of fn() over iters calls on the GPU (after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def paper_mfu(iters, peak):
    """(MFU, seconds a sample) of the paper's MM-DiT on phase 3's longest sample, bf16."""
    cfg = dataclasses.replace(dit.SIZES["paper"], grad_checkpointing=True)
    with torch.device(DEVICE):  # built on the GPU: a 2B model's initialisation on the CPU takes minutes
        net = text_to_video.TextToVideo(cfg, toy_text=False)
    h, w, T, L = PHASE3["h"], PHASE3["w"], PHASE3["frames"], PHASE3["text"]
    levels = pf.history_levels(T - 1, 0, 3) + [0]  # the history pyramid (Eq. 16), then frame 31 at stage 0
    frames = [torch.randn(1, cfg.in_channels, h >> lv, w >> lv, device=DEVICE) for lv in levels]
    video = sum((f.shape[-2] // cfg.patch_size) * (f.shape[-1] // cfg.patch_size) for f in frames)  # tokens
    text = (torch.randn(1, L, cfg.text_dim, device=DEVICE), torch.ones(1, L, dtype=torch.bool, device=DEVICE),
            torch.randn(1, cfg.pooled_dim, device=DEVICE))
    t = torch.full((1,), 0.7, device=DEVICE)

    def step():
        with autocast(DEVICE):  # bf16, the project's one mixed-precision context
            v = net(frames, text, t)
        v.float().square().mean().backward()
    s = seconds(step, iters)
    flops = metrics.train_flops(cfg.width, cfg.depth, video, L, cfg.mlp_ratio)
    print(f"1. paper MM-DiT ({sum(p.numel() for p in net.parameters()) / 1e9:.2f}B), {video:,} video + {L} text "
          f"tokens, bf16, grad checkpointing: {s:.3f} s forward+backward, {flops / 1e12:.0f} TFLOPs (model)")
    return flops / s / (peak * 1e12), s


def small_preset(steps):
    """The last metrics.jsonl record of `steps` steps of the small preset (the train.py loop)."""
    import train
    out = tempfile.mkdtemp(prefix="gpu_check_small_")
    try:
        cfg = config.parse_args(["--preset=small", f"--out_dir={out}", f"--max_steps={steps}",
                                 f"--log_every={max(1, steps // 2)}", "--eval_captions=0", "--warmup_steps=1"])
        train.train(cfg, quiet=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            record = [json.loads(line) for line in f][-1]  # the second half: warm
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"2. --preset=small, {steps} steps: {record['step_time']:.3f} s/step, {record['tokens_per_s']:,.0f} tok/s, "
          f"{record['samples_per_s']:.1f} samples/s, MFU {100 * (record['mfu'] or 0):.1f}%")
    return record


def toy_model(in_channels=3, width=64, depth=2, heads=2, **changes):
    """A toy-size MM-DiT with its weights moved off adaLN-Zero's identity (so outputs depend on them)."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(dit.SIZES["toy"], in_channels=in_channels, width=width, depth=depth, heads=heads,
                              **changes)
    net = text_to_video.TextToVideo(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net


def cuda_against_cpu():
    """(max |diff| at fp32, mean |diff| under bf16 autocast) of CUDA samples against CPU ones."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    cfg = dataclasses.asdict(config.parse_args(["--preset=tiny-pixel", "--sample_steps=20,20,20",
                                                "--sample_steps_later=10,10,10"]))
    captions = ["a red circle moving right", "a blue square moving up"]
    net = toy_model(patch_size=4)
    with torch.no_grad():
        cpu = sample.generate(net, captions, cfg, 4, seed=3, device="cpu", progress=False)
        net.to(DEVICE)
        fp32 = sample.generate(net, captions, cfg, 4, seed=3, device=DEVICE, progress=False).cpu()
        with autocast(DEVICE):  # bf16, the project's one mixed-precision context
            bf16 = sample.generate(net, captions, cfg, 4, seed=3, device=DEVICE, progress=False).float().cpu()
    return (fp32 - cpu).abs().max().item(), (bf16 - cpu).abs().mean().item()


def cache_ratio(frames=16):
    """Sampling time with the history cache over without, at `frames` latent frames (bench_cache's model)."""
    net = toy_model(in_channels=16, width=768, depth=3, heads=12, per_frame_attention=True).to(DEVICE)
    cfg = dict(dataclasses.asdict(config.Config()), K=3, size=16, sample_steps="20,20,20",
               sample_steps_later="10,10,10", guidance=5.0, video_guidance=5.0)
    captions = [" ".join(f"word{j}" for j in range(32))]
    times = {}
    with torch.no_grad():
        for cache in (False, True):
            times[cache] = seconds(lambda: sample.generate(net, captions, cfg, frames, seed=0, device=DEVICE,
                                                           progress=False, cache=cache), 1)
    return times[True] / times[False], times


def main(argv):
    args = parse(argv)
    if not torch.cuda.is_available():
        raise SystemExit(f"error: toy/gpu_check.py needs a CUDA GPU; torch {torch.__version__} sees none here")
    start, name = time.time(), torch.cuda.get_device_name()
    peak = metrics.peak_tflops(DEVICE)
    if peak is None:
        raise SystemExit(f"error: the bf16 peak of {name} is unknown; add it to metrics.PEAK_BF16_TFLOPS")
    print(f"{name}, bf16 peak {peak:.0f} TFLOP/s, torch {torch.__version__}")
    mfu, _ = paper_mfu(args.mfu_iters, peak)
    torch.cuda.empty_cache()  # the 2B model's memory back for the rest
    print(f"   MFU: {100 * mfu:.1f}%")
    small = small_preset(args.steps)
    fp32, bf16 = cuda_against_cpu()
    ok32, ok16 = fp32 <= args.fp32_tolerance, bf16 <= args.bf16_tolerance
    print(f"3. CUDA vs CPU sampling: fp32 max |diff| {fp32:.2e} ({'ok' if ok32 else 'FAIL'}, tolerance "
          f"{args.fp32_tolerance:g}); bf16 mean |diff| {bf16:.2e} ({'ok' if ok16 else 'FAIL'}, tolerance "
          f"{args.bf16_tolerance:g})")
    ratio, times = cache_ratio()
    print(f"4. history cache at 16 latent frames: {times[True]:.2f} s cached, {times[False]:.2f} s uncached, "
          f"ratio {ratio:.3f}")
    memory = torch.cuda.max_memory_allocated() / 1e9
    print(f"5. peak memory {memory:.1f} GB")
    print(f"GPU check on {name}: MFU {100 * mfu:.1f}% (paper MM-DiT, phase 3 sample, bf16); small preset "
          f"{small['tokens_per_s']:,.0f} tok/s; sampling CUDA vs CPU fp32 {fp32:.1e} {'ok' if ok32 else 'FAIL'}, "
          f"bf16 {bf16:.1e} {'ok' if ok16 else 'FAIL'}; cache ratio {ratio:.3f} at 16 frames; peak "
          f"{memory:.1f} GB; {time.time() - start:.0f} s")
    if not (ok32 and ok16):
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
