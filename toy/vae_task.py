"""
The causal video VAE of App. B (vae.py) as a task of train.py (`python train.py --preset=vae-toy`,
and the VAE phase of a latent preset that trains its own): batches of clips of the toy data, the
VAE's loss (vae.VAETraining), and at the end the held-out PSNR, the latent statistics, the scores of
its reconstructions and out_dir/vae.pt, the checkpoint the video presets encode with.
Tensor legend: video [B, 3, T, H, W] in [-1, 1].
"""
import dataclasses
import os

import torch

import config
import vae
from common import fail, is_master, read_checkpoint, save_torch
from config import run_dir, vae_phase
from toy import data, evaluate


class VAETask:
    """Batches of clips of the run's data (shapes by default) in [-1, 1]. No separate image batches
    are needed: the encoder is causal and replicate-padded, so frame 0 of every clip is encoded
    exactly as an image."""
    held_out_seed = 10 ** 15 + 7  # far from the (seed, rank, step) seeds of the training batches

    def __init__(self, cfg):
        self.cfg = cfg
        self.data = data.SOURCES[cfg.data]  # the name is checked: config.validate_settings
        vae_cfg = vae.VAE_SIZES[cfg.vae_size]
        if cfg.size % vae_cfg.spatial_factor:
            fail(f"--size={cfg.size} must be a multiple of {vae_cfg.spatial_factor}, the VAE's spatial factor")
        try:
            vae_cfg.latent_frames(cfg.vae_frames)
        except ValueError as e:
            fail(f"--vae_frames={cfg.vae_frames} {e}")

    def model(self):
        c = self.cfg
        return vae.VAETraining(vae.VAE_SIZES[c.vae_size], c.kl_weight, c.pixel_loss, c.disc_weight,
                               c.disc_start * c.grad_accum)

    def batch(self, g, device):
        x, _ = self.data(self.cfg.batch_size, frames=self.cfg.vae_frames, size=self.cfg.size,
                         generator=g)  # [B, 3, T, H, W]
        return dict(x=x.to(device))

    def extra(self):
        return {}

    def finish(self, model, out_dir, device):
        """Held-out PSNR of the EMA VAE, latent statistics from the same clips, out_dir/vae.pt."""
        v = model.vae.eval()
        # longer than the training clips: the VAE is convolutional
        frames = 1 + 4 * v.cfg.temporal_factor
        g = torch.Generator().manual_seed(self.held_out_seed)
        clips = [self.data(16, frames=frames, size=self.cfg.size, generator=g)[0].to(device) for _ in range(4)]
        vae.estimate_latent_stats(v, clips)
        scores = {}
        with torch.no_grad():
            db = sum(vae.psnr(v.decode(v.encode(x)), x) for x in clips) / len(clips)
            # faithful as the video presets need: reconstructions score like the clips
            if self.cfg.data == "shapes":
                captions = data.SHAPE_CAPTIONS  # one clip per caption
                x, _ = data.shapes_batch(len(captions), frames=frames, size=self.cfg.size, generator=g,
                                         captions=captions)
                scores = evaluate.score_shapes(v.decode(v.encode(x.to(device))).cpu(), captions)
                scores = {k: scores[k] for k in ("colour", "shape", "direction", "consistency")}
        save_torch(os.path.join(out_dir, "vae.pt"), dict(kind="causal-vae", config=dataclasses.asdict(v.cfg),
                                                         model=v.state_dict(), psnr=db, scores=scores,
                                                         recipe=config.vae_recipe(self.cfg)))
        print(f"held-out PSNR {db:.2f} dB on {16 * len(clips)} clips of {frames} frames; wrote {out_dir}/vae.pt")
        if scores:
            print("reconstructions of the 48 captions score (toy/evaluate.py, the clips score 1.0): "
                  + ", ".join(f"{k} {val:.3f}" for k, val in scores.items()))


def train_vae_first(cfg, train, quiet=False):
    """Phase 1 of a latent video preset (vae_steps > 0), config.vae_phase's run. A vae.pt already
    there is reused if it was trained the same way (or the run resumes: the checkpoint was trained
    on it); --overwrite=true trains a new one; a run stopped in this phase resumes it with
    --resume=true. train: train.train. Returns the video run's config with vae_ckpt pointing at it."""
    vae_cfg = vae_phase(cfg)
    vae_path = os.path.join(vae_cfg.out_dir, "vae.pt")
    if cfg.resume and os.path.exists(os.path.join(run_dir(cfg), "ckpt.pt")):
        if not os.path.exists(vae_path):  # the video model was trained on that VAE's latents
            fail(f"--resume=true but the run's VAE {vae_path} is missing")
        return dataclasses.replace(cfg, vae_ckpt=vae_path)
    same = os.path.exists(vae_path) and not cfg.overwrite and \
        read_checkpoint(vae_path, "causal-vae", "VAE checkpoint").get("recipe") == config.vae_recipe(vae_cfg)
    if same:
        if not quiet and is_master():
            print(f"using the VAE of an earlier run of this preset, trained the same way: {vae_path}")
    else:  # stopped in the VAE phase: --resume=true continues it
        resume = cfg.resume and os.path.exists(os.path.join(vae_cfg.out_dir, "ckpt.pt"))
        train(dataclasses.replace(vae_cfg, resume=resume), quiet)
    # no video checkpoint yet: it starts
    return dataclasses.replace(cfg, vae_ckpt=vae_path, resume=False)
