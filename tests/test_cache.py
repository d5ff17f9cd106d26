"""The KV cache of cached sampling (dit.KVCache): cached equals uncached for text-to-video,
image-to-video and continuation, with CFG, per-frame attention on and off, x-prediction and
interpolated positions; the part of old frames is kept from frame to frame; models it would be
wrong for (bidirectional, history at the current time) refuse it and sample uncached;
--max_history; the benchmark's quick mode. CPU, fp32 (one fp64 check), tiny models."""
import dataclasses

import pytest
import torch

import config
import dit
import text_to_video
import pyramid_flow as pf
import sample
import train

TINY = dit.DiTConfig(in_channels=3, patch_size=2, width=32, depth=3, heads=2, text_dim=12, pooled_dim=10)
CAPTIONS = ["a red circle moving left", "a blue square"]  # different lengths: the text has padding
SIDE, K = 8, 3
TOL = dict(atol=1e-5, rtol=1e-5)


def make_net(seed=0, **overrides):
    """A tiny TextToVideo with every weight perturbed, so the zero-init of adaLN-Zero and the final
    layer does not hide what the cache could get wrong."""
    torch.manual_seed(seed)
    net = text_to_video.TextToVideo(dataclasses.replace(TINY, **overrides), vocab_size=64, max_len=8).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def run_config(**kw):
    """The settings generate reads from a run (pixel space: the latent side is the frame side)."""
    return dict(K=K, size=SIDE, sample_steps="2,1,2", sample_steps_later="2,2,3", guidance=3.0,
                video_guidance=2.0, prediction="v", positions="extrapolate") | kw


def video(net, cfg, frames=6, prefix=None, cache=True, max_history=0, condition_calls=None):
    """The latent video of pf.sample_video for the run's settings, before any clamping."""
    windows, B = pf.stage_windows(K), len(CAPTIONS)
    grid = (SIDE, SIDE) if cfg["positions"] == "interpolate" else None
    velocity = sample.model_velocity(net, cfg, CAPTIONS, cfg["guidance"], cfg["video_guidance"], grid)
    condition = sample.HistoryCache(net, cfg, CAPTIONS, cfg["video_guidance"], grid) if cache else None
    if condition is not None and condition_calls is not None:
        inner = condition

        def condition(history, x, k):
            out = inner(history, x, k)
            condition_calls.append(isinstance(out, dit.KVCache))
            return out
    return pf.sample_video(velocity, (B, 3, SIDE, SIDE), frames, windows, [2, 1, 2], [3, 2, 2], prefix=prefix,
                           generator=torch.Generator().manual_seed(0), condition=condition,
                           max_history=max_history)


def prefix_frames(n):
    return torch.randn(len(CAPTIONS), 3, n, SIDE, SIDE, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("grid", [None, (SIDE, SIDE)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, TOL), (torch.float64, dict(atol=1e-12, rtol=1e-12))])
def test_cached_model_call_equals_uncached(per_frame, grid, dtype, tol):
    model = make_net(per_frame_attention=per_frame).to(dtype)
    g = torch.Generator().manual_seed(1)
    history = [torch.randn(2, 3, s, s, generator=g, dtype=dtype) for s in (2, 4, 8)]  # a temporal pyramid
    x, t = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype), torch.rand(2, generator=g, dtype=dtype)
    text, mask, pooled = model.text_encoder(CAPTIONS)
    assert not mask.all()                                                      # padding is in the cache
    want = model.dit(history + [x], text, mask, pooled, t, grid=grid)
    cache = model.dit.make_cache(history, text, mask, pooled, x.shape[-2:], grid=grid)
    got = model.dit([x], text, mask, pooled, t, grid=grid, cache=cache)
    torch.testing.assert_close(got, want, **tol)
    got2 = model.dit([x], text, mask, pooled, 1 - t, grid=grid, cache=cache)  # one cache, every step
    torch.testing.assert_close(got2, model.dit(history + [x], text, mask, pooled, 1 - t, grid=grid), **tol)
    P = mask.shape[1] + (2 * 2 + 4 * 4 + 8 * 8) // 2 ** 2                     # text + history tokens
    assert cache.nbytes() == 2 * TINY.depth * 2 * P * TINY.width * dtype.itemsize  # k and v
    for n in (1, 2, 3):  # a cache of the first n frames, extended by the others: the same keys and values
        base = model.dit.make_cache(history[:n], text, mask, pooled, x.shape[-2:], grid=grid)
        extended = model.dit.make_cache(history, text, mask, pooled, x.shape[-2:], grid=grid, base=base)
        for a, b in zip(extended.keys + extended.values, cache.keys + cache.values):
            torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(model.dit([x], text, mask, pooled, t, grid=grid, cache=extended), want, **tol)


def test_cached_call_refuses_another_grid_or_batch():
    model = make_net()
    history = [torch.randn(2, 3, 4, 4)]
    text, mask, pooled = model.text_encoder(CAPTIONS)
    cache = model.dit.make_cache(history, text, mask, pooled, (4, 4))
    with pytest.raises(ValueError, match="grid of its cache"):
        model.dit([torch.randn(2, 3, 8, 8)], text, mask, pooled, torch.rand(2), cache=cache)
    with pytest.raises(ValueError, match="no KV cache without history"):
        model.dit.make_cache([], text, mask, pooled, (4, 4))


@pytest.mark.parametrize("start", ["text", "image", "continuation"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_cached_sampling_equals_uncached(start, per_frame):
    net, cfg = make_net(per_frame_attention=per_frame), run_config()
    prefix = {"text": None, "image": prefix_frames(1), "continuation": prefix_frames(2)}[start]
    calls = []
    cached = video(net, cfg, prefix=prefix, condition_calls=calls)
    uncached = video(net, cfg, prefix=prefix, cache=False)
    torch.testing.assert_close(cached, uncached, **TOL)
    generated_with_history = 6 - (1 if prefix is None else prefix.shape[2])
    assert calls.count(True) == generated_with_history * K                     # a cache per frame and stage
    assert calls.count(False) == (K if prefix is None else 0)                  # the first frame: uncached


@pytest.mark.parametrize("overrides", [dict(prediction="x"), dict(positions="interpolate"),
                                       dict(guidance=1.0, video_guidance=1.0)])
def test_cached_sampling_equals_uncached_for_x_prediction_interpolated_positions_and_no_cfg(overrides):
    net, cfg = make_net(), run_config(**overrides)
    torch.testing.assert_close(video(net, cfg), video(net, cfg, cache=False), **TOL)


@pytest.mark.parametrize("overrides", [dict(causal=False), dict(history_time="current")])
def test_models_without_a_valid_cache_refuse_it_and_sample_uncached(overrides):
    net, cfg = make_net(**overrides), run_config()
    assert not net.dit.cacheable
    with pytest.raises(ValueError, match="no KV cache for this model"):
        net.make_cache([torch.randn(2, 3, 8, 8)], CAPTIONS, (8, 8))
    calls = []
    torch.testing.assert_close(video(net, cfg, condition_calls=calls), video(net, cfg, cache=False), atol=0, rtol=0)
    assert calls and not any(calls)


def test_current_history_time_modulates_history_with_t():
    """The release's design: history tokens (and text) follow the current t, so they cannot be cached."""
    outs = {}
    for history_time in ("clean", "current"):
        net = make_net(history_time=history_time)
        text, mask, pooled = net.text_encoder(CAPTIONS)
        frames = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(j)) for j in range(2)]
        states = []
        hook = net.dit.blocks[0].register_forward_hook(lambda m, i, out: states.append(out[0][:, :16]))
        for t in (0.2, 0.7):
            net.dit(frames, text, mask, pooled, torch.full((2,), t))
        hook.remove()
        outs[history_time] = torch.equal(*states)                               # history tokens of block 0
    assert outs == {"clean": True, "current": False}


def test_a_run_trains_and_samples_with_history_at_the_current_time(tmp_path):
    cfg = dataclasses.replace(config.parse_args(["--preset=tiny-pixel"]), out_dir=str(tmp_path), max_steps=1,
                              width=32, depth=1, heads=1, batch_size=6, frames=3, eval_captions=0, patch=4,
                              history_time="current")
    assert train.Video(cfg).dit_cfg.history_time == "current"
    train.train(cfg, quiet=True)
    net, run, _ = sample.load(str(tmp_path / "ckpt.pt"))
    assert net.dit.cfg.history_time == "current"
    kw = dict(steps=[1, 1, 1], steps_later=[1, 1, 1], progress=False)
    a = sample.generate(net, ["a red circle moving left"], run, 3, cache=True, **kw)
    b = sample.generate(net, ["a red circle moving left"], run, 3, cache=False, **kw)
    assert torch.equal(a, b)
    with pytest.raises(SystemExit, match="--history_time must be one of clean, current"):
        train.validate(dataclasses.replace(cfg, history_time="noisy", overwrite=True))


def test_generate_cache_flag_gives_the_same_video():
    net, cfg = make_net(), run_config()
    kw = dict(steps=[1, 1, 2], steps_later=[1, 2, 1], progress=False, seed=3)
    a = sample.generate(net, CAPTIONS, cfg, 3, cache=True, **kw)
    b = sample.generate(net, CAPTIONS, cfg, 3, cache=False, **kw)
    torch.testing.assert_close(a, b, **TOL)


def test_max_history_keeps_the_most_recent_frames():
    seen = []

    def velocity(history, x, k, t):
        seen.append([h.mean().item() for h in history])
        return torch.zeros_like(x)
    prefix = torch.arange(5.0).view(1, 1, 5, 1, 1).expand(1, 1, 5, 4, 4)       # frame j is all j
    pf.sample_video(velocity, (1, 1, 4, 4), 6, pf.stage_windows(2), 1, prefix=prefix, max_history=2)
    assert seen == [[3.0, 4.0]] * 2                                            # frames 3 and 4, both stages
    with pytest.raises(ValueError, match="max_history"):
        pf.sample_video(velocity, (1, 1, 4, 4), 6, pf.stage_windows(2), 1, prefix=prefix, max_history=-1)


def test_max_history_at_least_the_frame_count_changes_nothing():
    net, cfg = make_net(), run_config()
    full = video(net, cfg, frames=4)
    torch.testing.assert_close(video(net, cfg, frames=4, max_history=3), full, atol=0, rtol=0)
    torch.testing.assert_close(video(net, cfg, frames=4, max_history=9), full, atol=0, rtol=0)
    short = video(net, cfg, frames=4, max_history=1)
    torch.testing.assert_close(short[:, :, :2], full[:, :, :2], atol=0, rtol=0)  # frames 0, 1 see all there is
    assert not torch.allclose(short[:, :, 2:], full[:, :, 2:])
    torch.testing.assert_close(short, video(net, cfg, frames=4, max_history=1, cache=False), **TOL)


def test_sample_command_line_takes_cache_and_max_history(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(sample, "load", lambda path, device, **kw: (make_net(), run_config(frames=3), None))
    monkeypatch.setattr(sample, "generate", lambda *a, **kw: seen.update(kw) or torch.zeros(1, 3, 3, SIDE, SIDE))
    out = str(tmp_path / "v.gif")
    sample.main(["--ckpt=" + __file__, "--prompt=a red circle", f"--out={out}", "--cache=false", "--max_history=2"])
    assert seen["cache"] is False and seen["max_history"] == 2
    sample.main(["--ckpt=" + __file__, "--prompt=a red circle", f"--out={out}"])
    assert seen["cache"] is True and seen["max_history"] == 0
    with pytest.raises(SystemExit, match="--max_history must be >= 0"):
        sample.main(["--ckpt=" + __file__, "--prompt=a red circle", f"--out={out}", "--max_history=-1"])


def test_bench_quick_mode_prints_the_ratio(capsys):
    from toy import bench_cache
    bench_cache.main(["--quick"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    prefix = "sampling time ratio, cached / uncached at 16 frames: "
    assert last.startswith(prefix) and float(last[len(prefix):]) > 0
    bench_cache.main(["--quick", "--batch=2", "--frames=2"])  # two videos a call: still the same videos
    rows = capsys.readouterr().out.strip().splitlines()
    assert "batch 2" in rows[0] and rows[-1].split()[0] == "2" and float(rows[-1].split()[-1]) < 1e-4
    bench_cache.main(["--quick", "--profile"])
    out = capsys.readouterr().out
    assert "uncached, 6 frames" in out and "cached, 6 frames" in out and "matrix products" in out
    with pytest.raises(SystemExit, match="bad option '--batch=0'"):
        bench_cache.main(["--quick", "--batch=0"])


def test_old_frames_cache_is_kept_from_frame_to_frame():
    """Frames at the lowest level stay there: each frame only extends their cache (per stage)."""
    net, cfg = make_net(), run_config()
    runs = []
    make_cache = net.dit.make_cache

    def spy(history, *args, base=None, **kw):
        runs.append(len(history) - (base.frames if base is not None else 0))  # history frames it runs
        return make_cache(history, *args, base=base, **kw)
    net.dit.make_cache = spy
    cached = video(net, cfg, frames=6)
    torch.testing.assert_close(cached, video(net, cfg, frames=6, cache=False), **TOL)
    # frames run at frame i = 1..5: at stage 2 only frame i-1 (the rest is kept), at stage 1 also i-2's
    # arrival at the lowest level, at stage 0 frames i-1, i-2 and the arrival of i-3 (fewer while i < 3)
    assert sum(runs) == (1 + 1 + 1) + (1 + 2 + 2) + 3 * (1 + 2 + 3) == 26  # without keeping: 3 * (1 + ... + 5) = 45
