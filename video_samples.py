"""
The samples of a video run (Algorithm 1 through sample.generate): every --sample_every steps, the
EMA's videos of a few fixed captions in out_dir/samples/ (a sharded EMA too: every rank samples in
step, rank 0 writes), and, at the end of a toy run, the report: the evaluation captions sampled and
scored (toy/evaluate.py), a grid GIF, a few single videos and report.json.
Tensor legend: video [B, 3, F, H, W].
"""
import dataclasses
import os

import torch

from common import autocast, is_master, load_vae, save_json, tile, write_video
from toy import data, evaluate


def during_training(task, ema, out_dir, step, device, count=4):
    """The EMA's videos of `count` fixed captions (seed 0) as one grid, out_dir/samples/step<N>.gif:
    the toy data's first captions, or the data set's, encoded by the frozen --text_encoder (set on
    the EMA for the call) and decoded by the --vae_ckpt, both loaded once. Under FSDP (ema has
    unshard) the root's own weights (embeddings, final layer) are gathered for the call, the blocks
    gather theirs as they run, and the KV cache stays off (it calls parts of blocks)."""
    import sample  # the loop's one way into sample.py, as the report's
    cfg, features = task.cfg, hasattr(task, "null")
    if features:
        if getattr(task, "sampler", None) is None:  # (text encoder, VAE)
            task.sampler = (sample.frozen_text_encoder(cfg.text_encoder, task.dit_cfg, device),
                            load_vae(cfg.vae_ckpt).to(device))
        captions, vae_model = [e["text"] for e in task.data.entries[:count]], task.sampler[1]
        ema.net.text_encoder = task.sampler[0]
    else:
        captions = (data.SHAPE_CAPTIONS if cfg.data == "shapes" else data.DIGIT_CAPTIONS)[:count]
        vae_model = task.vae.to(device) if task.vae else None
    sharded = hasattr(ema, "unshard")
    if sharded:
        ema.unshard()
    with torch.no_grad(), autocast(device):  # FSDP on CUDA holds bf16 weights
        videos = sample.generate(ema.net, captions, dataclasses.asdict(cfg), cfg.frames, vae=vae_model, seed=0,
                                 device=device, progress=False, cache=not sharded)
    if sharded:
        ema.reshard()
    if features:
        ema.net.text_encoder = None  # not part of the checkpoint
    if is_master():
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        write_video(os.path.join(out_dir, "samples", f"step{step:07d}.gif"), tile(videos.float().cpu(), len(captions)))


def report(net, cfg, vae_model, out_dir, device, seed=1234):
    """End of a video run: sample the evaluation captions with sample.generate, score them
    (toy/evaluate.py), write a grid GIF, a few single videos and report.json next to the
    checkpoint; returns the scores."""
    import sample
    cfg = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    pool = data.SHAPE_CAPTIONS if cfg["data"] == "shapes" else data.DIGIT_CAPTIONS
    captions = [pool[i % len(pool)] for i in range(cfg["eval_captions"])]
    net.eval()
    videos = sample.generate(net, captions, cfg, cfg["frames"], vae=vae_model, seed=seed, device=device)
    if cfg["data"] == "shapes":
        scores = evaluate.score_shapes(videos.cpu(), captions)
    else:
        clf = evaluate.load_or_train_digit_classifier(os.path.join("out", "digit_classifier.pt"))
        scores = evaluate.score_digits(videos.cpu(), captions, clf)
    scores = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}
    write_video(os.path.join(out_dir, "samples.gif"), tile(videos, cols=8))
    for j in range(min(4, len(captions))):
        write_video(os.path.join(out_dir, f"sample_{j}_{captions[j].replace(' ', '_')}.gif"), videos[j])
    save_json(os.path.join(out_dir, "report.json"), dict(captions=len(captions), seed=seed, scores=scores))
    print(f"{len(captions)} sampled captions: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"wrote {os.path.join(out_dir, 'samples.gif')} (grid, caption order of toy/data.py) and report.json")
    return scores
