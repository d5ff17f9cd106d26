"""The baselines of the toy experiments through the same code paths: full-sequence video flow
matching (Fig. 8: the whole clip noisy at one t, bidirectional, K = 1) and standard single-stage
flow matching (Fig. 7: K = 1 images) train a step and sample clips of the right shape."""
import dataclasses

import pytest
import torch

import config
import sample
import train


def settings(tmp_path, **kw):
    """Pixel space, a one-layer model, one step: the smallest run of the Video task."""
    base = dict(out_dir=str(tmp_path), max_steps=1, log_every=1, width=32, depth=1, heads=1, patch=4,
                batch_size=4, frames=3, eval_captions=0, vae_ckpt="", vae_steps=0, data_pool=0, K=1, stage_ratio="1",
                sample_steps="2", sample_steps_later="2", warmup_steps=1)
    return dataclasses.replace(config.parse_args(["--preset=tiny"]), **(base | kw))


def test_full_sequence_step_puts_every_frame_in_the_loss_at_one_t(tmp_path):
    cfg = settings(tmp_path, full_sequence=True, causal=False, image_ratio=0.0)
    task = train.Video(cfg)
    (group,) = task.batch(torch.Generator().manual_seed(0), "cpu")["groups"]
    assert group["history"] == [] and group["x_t"].shape == (4, 3, 3, 32, 32)  # [B, C, T, H, W]
    assert group["target"].shape == group["x_t"].shape and group["t"].shape == (4,)
    losses, _ = train.train(cfg, quiet=True)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()


def test_full_sequence_samples_whole_clips_with_the_full_sequence_network(tmp_path, monkeypatch):
    cfg = settings(tmp_path, full_sequence=True, causal=False)
    train.train(cfg, quiet=True)
    net, ck_cfg, vae = sample.load(str(tmp_path / "ckpt.pt"))
    calls = []
    forward = net.forward
    monkeypatch.setattr(net, "forward", lambda frames, *a, **kw: calls.append((len(frames), kw)) or
                        forward(frames, *a, **kw))
    videos = sample.generate(net, ["a red circle moving left"] * 2, ck_cfg, 3, seed=0, guidance=1.0, progress=False)
    assert videos.shape == (2, 3, 3, 32, 32)
    assert len(calls) == 2 and all(n == 3 and kw["all_frames"] for n, kw in calls)  # 2 Euler steps, whole clip


def test_full_sequence_needs_one_stage_and_bidirectional_attention(tmp_path):
    with pytest.raises(SystemExit, match="--K=1 --causal=false"):
        train.validate(settings(tmp_path, full_sequence=True, causal=True))
    with pytest.raises(SystemExit, match="--K=1 --causal=false"):
        train.validate(settings(tmp_path, full_sequence=True, causal=False, K=2, stage_ratio="1,1",
                             sample_steps="1,1", sample_steps_later="1,1"))


def test_single_stage_images_are_standard_flow_matching(tmp_path):
    """K = 1 on one-frame clips: full resolution, start = noise, end = data (Eqs. 9-10 with one stage)."""
    cfg = settings(tmp_path, frames=1, image_ratio=1.0)
    (group,) = train.Video(cfg).batch(torch.Generator().manual_seed(0), "cpu")["groups"]
    assert group["stage"] == 0 and group["x_t"].shape == (4, 3, 32, 32) and group["history"] == []
    train.train(cfg, quiet=True)
    net, ck_cfg, _ = sample.load(str(tmp_path / "ckpt.pt"))
    images = sample.generate(net, ["a blue square moving up"], ck_cfg, 1, seed=0, progress=False)
    assert images.shape == (1, 3, 1, 32, 32)
