"""
What the toy experiments share (toy/spatial_pyramid.py, temporal_pyramid.py, renoise.py, causal.py):
settings built on the quick start's preset (`tiny`, as it was: BASE), one VAE trained once for all of them, training
through train.train with an evaluation every few steps whose own time is kept out of the training
clock, the scores of sampled captions, a printed table and a PNG.

Each arm of a comparison is trained with the same data, seed, batch and steps; only the settings
the experiment varies differ. The wall time of a curve is training time only: from the end of the
first step (which also builds the data set), evaluations excluded, with the first step counted as
the mean of the others.
Tensor legend: video [B, C, T, H, W] in [-1, 1].
"""
import dataclasses
import os
import sys
import threading
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import config  # noqa: E402
import dit  # noqa: E402
import pyramid_flow as pf  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import vae as vae_module  # noqa: E402
from toy import data, evaluate, vae_task  # noqa: E402

# the shared VAE in vae/, each script in its folder
EXPERIMENTS_DIR = os.path.join("out", "experiments")
# The quick start as it was when the experiments were measured (toy/README.md): its VAE trained here
# (900 steps, 28.0 dB; out/experiments/vae), a constant learning rate after warm-up.
BASE = dict(vae_ckpt="", vae_steps=900, lr_decay="none")
# --quick: a one-layer model, a 2-step VAE and a data set of 12 clips; seconds, for the tests
QUICK = dict(width=32, depth=1, heads=1, vae_steps=2, data_pool=12, batch_size=12, warmup_steps=1, log_every=2)
QUICK_OPTIONS = dict(every=2, seeds="1", captions=4, long=9)  # the options' values under --quick (long: causal's)
THUMBNAIL = 8  # px pooled into one feature of the pixel Frechet distance: 32 px frames -> 4 x 4 x 3


def parse(argv, own, script_defaults, quick_defaults):
    """--quick, the script's own options (`own`: name -> default, typed by it) and train.py settings
    (--key=value of Config) on top of the tiny preset, in the order: preset < script_defaults <
    quick_defaults (with --quick) < the command line. Returns (cfg, options, quick)."""
    quick = "--quick" in argv
    opts, rest = dict(own) | ({k: v for k, v in QUICK_OPTIONS.items() if k in own} if quick else {}), []
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if arg == "--quick":
            continue
        if arg.startswith("--") and key in own:
            if not eq:
                raise SystemExit(f"error: give --{key}=VALUE")
            opts[key] = config.convert(key, value, type(own[key]))
        else:
            rest.append(arg)
    layers = [BASE, script_defaults] + ([QUICK, quick_defaults] if quick else [])
    settings = [f"--{k}={v}" for layer in layers for k, v in layer.items()]
    return config.parse_args(["--preset=tiny", *settings, *rest]), opts, quick


@dataclasses.dataclass
class Setup:
    cfg: config.Config  # the settings both arms start from, on the shared VAE's latents
    opts: dict
    quick: bool
    out: str           # this script's folder
    vae: object        # the frozen VAE (None in pixel space)
    captions: list
    seeds: list


def setup(argv, name, own, script_defaults, quick_defaults):
    """parse, then the shared VAE (trained if needed), the evaluation captions and seeds (own
    options `captions` and `seeds`, if the script has them)."""
    cfg, opts, quick = parse(argv, own, script_defaults, quick_defaults)
    if cfg.data != "shapes":
        raise SystemExit(f"error: the experiments score shapes videos (toy/evaluate.py), not --data={cfg.data}")
    if opts.get("every", 1) < 1:
        raise SystemExit(f"error: --every={opts['every']} must be at least 1")
    out = cfg.out_dir or os.path.join(EXPERIMENTS_DIR, name)
    cfg = with_vae(cfg, cfg.out_dir or EXPERIMENTS_DIR, quiet=quick)
    try:
        seeds = [int(v) for v in str(opts.get("seeds", "1")).split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds wants integers separated by commas, got {opts['seeds']!r}") from None
    return Setup(cfg, opts, quick, out, load_vae(cfg), captions_for(opts.get("captions", 48)), seeds)


def with_vae(cfg, vae_home, quiet=False):
    """cfg on the latents of the tiny recipe's VAE, trained once in vae_home/vae (vae_task.train_vae_first
    reuses a vae.pt trained the same way; with no --out_dir every experiment shares
    out/experiments/vae); pixel-space settings (vae_steps=0) and a given --vae_ckpt pass through."""
    if cfg.vae_ckpt or cfg.vae_steps == 0:
        return cfg
    home = dataclasses.replace(cfg, out_dir=vae_home, resume=False, overwrite=False)
    return dataclasses.replace(cfg, vae_ckpt=vae_task.train_vae_first(home, train.train, quiet).vae_ckpt)


def load_vae(cfg):
    return common.load_vae(cfg.vae_ckpt) if cfg.vae_ckpt else None


def captions_for(n):
    """The first n of the 48 shapes captions (cycling): the experiments score shapes videos."""
    return [data.SHAPE_CAPTIONS[i % len(data.SHAPE_CAPTIONS)] for i in range(n)]


def pixel_frechet(videos, reference):
    """Frechet distance between the frames of two sets of videos [B, 3, T, H, W], each frame pooled
    to THUMBNAIL-px colour thumbnails (4 x 4 x 3 = 48 features at 32 px): a coarse distribution
    distance (layout, colour, size) with no learned features; 0 for identical statistics."""
    def feats(v):
        frames = v.float().transpose(1, 2).flatten(0, 1)                  # [B T, 3, H, W]
        return torch.nn.functional.avg_pool2d(frames, THUMBNAIL).flatten(1)  # [B T, 3 (H/8) (W/8)]
    return evaluate.frechet_distance(feats(videos), feats(reference))


def blob_features(videos):
    """Per frame of videos [B, 3, T, H, W] in [-1, 1], the object (evaluate's largest bright blob)
    in 10 numbers [B T, 10]: area (share of the frame), centroid row and column (in frame units),
    overlap (IoU) with the four shape templates of evaluate, mean colour (rgb in [0, 1]); zeros
    where there is no object. Low-dimensional, so a Frechet distance over them is well posed
    against a few hundred real images (the 8-pixel thumbnails of pixel_frechet cannot see shape)."""
    rgb, mask, area, cy, cx = evaluate._blobs(videos)
    H, W = videos.shape[-2:]
    ious = evaluate._template_ious(mask, area, cy, cx).nan_to_num(0.0)  # [N, 4]
    colour = (rgb * mask[:, None]).sum((2, 3)) / area.clamp(min=1)[:, None]  # [N, 3]
    return torch.cat([torch.stack([area / (H * W), cy / H, cx / W], 1), ious, colour], 1)


def frame_constancy(videos):
    """Share of videos whose per-frame colour, and per-frame shape, never change: each frame is
    classified on its own (a one-frame video) by evaluate.classify_shapes."""
    B, _, T = videos.shape[:3]
    frames = videos.transpose(1, 2).flatten(0, 1)[:, :, None]             # [B T, 3, 1, H, W]
    preds = evaluate.classify_shapes(frames)
    colour = np.array([p["colour"] for p in preds]).reshape(B, T)
    shape = np.array([p["shape"] for p in preds]).reshape(B, T)
    return dict(colour_kept=float((colour == colour[:, :1]).all(1).mean()),
                shape_kept=float((shape == shape[:, :1]).all(1).mean()))


def identity_change(videos):
    """Share of videos whose object changes identity: the colour or shape of the first frame in
    which the object is whole (its blob clear of the frame's edge, evaluate.blob_tracks) against
    the last such frame, each frame classified on its own; videos with fewer than two whole frames
    are left out (NaN if none has two). Frames the object enters or leaves through the edge would
    otherwise count the scorer's flicker on a cut blob as a change."""
    B, _, T = videos.shape[:3]
    whole = evaluate.blob_tracks(videos)["border"].numpy() > 0                  # [B, T]
    frames = videos.transpose(1, 2).flatten(0, 1)[:, :, None]             # [B T, 3, 1, H, W]
    preds = evaluate.classify_shapes(frames)
    ids = np.array([(p["colour"], p["shape"]) for p in preds], dtype=object).reshape(B, T, 2)
    changes = []
    for b in range(B):
        seen = np.flatnonzero(whole[b])
        if len(seen) >= 2:
            changes.append(tuple(ids[b, seen[0]]) != tuple(ids[b, seen[-1]]))
    return float(np.mean(changes)) if changes else float("nan")


def real_clips(captions, frames, size):
    """One real clip per caption (the reference of the Frechet distance), always the same ones."""
    return data.shapes_batch(len(captions), frames=frames, size=size, generator=0, captions=captions)[0]


def score(videos, captions):
    """The numbers every experiment reports for sampled shapes videos: evaluate.score_shapes'
    scores, frame_constancy and the pixel Frechet distance to real clips of the same captions."""
    scores = {k: v for k, v in evaluate.score_shapes(videos, captions).items() if isinstance(v, float)}
    reference = real_clips(captions, videos.shape[2], videos.shape[-1])
    return scores | frame_constancy(videos) | dict(frechet=pixel_frechet(videos, reference))


def sample_and_score(net, cfg, vae, captions, seeds, score_fn=score, frames=None, **kw):
    """Mean scores (score_fn) of the captions sampled with each seed (sample.generate, the run's
    settings unless kw says otherwise; `frames` default the run's), the videos of the first seed,
    the sampling seconds per seed."""
    runs, videos, t0 = [], None, time.perf_counter()
    for seed in seeds:
        v = sample.generate(net, captions, dataclasses.asdict(cfg), frames or cfg.frames, vae=vae,
                            seed=seed, progress=False, **kw)
        runs.append(score_fn(v, captions))
        videos = v if videos is None else videos
    seconds = (time.perf_counter() - t0) / len(seeds)
    return {k: float(np.nanmean([r[k] for r in runs])) for k in runs[0]}, videos, seconds


def train_and_evaluate(cfg, every, evaluate_fn, quiet=False, pause=None):
    """Train cfg through train.train, calling evaluate_fn(net) on the EMA network every `every`
    steps and at the end, then pause() if given (another arm's turn: its time is not this arm's).
    Returns dict(steps, seconds, flops, scores: one list entry per evaluation; step_seconds: mean
    training seconds a step; losses; net: the final EMA network); flops: step_flops of the steps."""
    curve = dict(steps=[], seconds=[], flops=[], scores=[])
    flops_a_step = train_flops(cfg)
    clock = dict(first=None, evaluating=0.0)

    def on_step(step, ema):
        now = time.perf_counter()
        curve["net"] = ema.net
        if step == 1:
            clock["first"] = now
        if step % every and step != cfg.max_steps:
            return
        # steps 2..step, + step 1
        trained = (now - clock["first"] - clock["evaluating"]) * step / max(1, step - 1)
        ema.net.eval()
        curve["scores"].append(evaluate_fn(ema.net))
        curve["steps"].append(step)
        curve["seconds"].append(trained)
        curve["flops"].append(step * flops_a_step)
        if not quiet:
            print(f"  {cfg.out_dir}, step {step}: {trained:.0f} s of training, " +
                  ", ".join(f"{k} {v:.3f}" for k, v in curve["scores"][-1].items()), flush=True)
        if pause is not None and step != cfg.max_steps:
            pause()
        clock["evaluating"] += time.perf_counter() - now

    # the experiment scores, not train's report
    cfg = dataclasses.replace(cfg, eval_captions=0, overwrite=True)
    losses, model = train.train(cfg, quiet=quiet, on_step=on_step)
    curve.update(losses=losses, step_seconds=curve["seconds"][-1] / cfg.max_steps)
    return curve


def run_arms(arms, out, every, vae, captions, seeds, quiet=False, score_fn=score, alternate=False):
    """Train each arm (name -> cfg) into out/<first word of its name> with train_and_evaluate,
    scoring sample_and_score(captions, seeds, score_fn) along the way. alternate: the arms take
    turns, `every` steps each (threads, one running at a time), so a host whose speed drifts slows
    all alike. Returns the curves (name -> curve, with `videos`: the last evaluation's samples of
    the first seed, and `sample_seconds`: its sampling seconds per seed)."""
    curves, turns = {}, Turns(len(arms))

    def run(i, name, arm):
        arm = dataclasses.replace(arm, out_dir=os.path.join(out, name.split()[0]))
        print(f"{name}: {arm.max_steps} steps of {arm.batch_size} clips", flush=True)
        last = {}

        def evaluate_fn(net):
            scores, last["videos"], last["sample_seconds"] = sample_and_score(net, arm, vae, captions, seeds,
                                                                              score_fn)
            return scores
        pause = (lambda: turns.pause(i)) if alternate else None
        curves[name] = train_and_evaluate(arm, every, evaluate_fn, quiet=quiet, pause=pause) | last
    if not alternate:
        for i, (name, arm) in enumerate(arms.items()):
            run(i, name, arm)
        return curves
    errors = []

    def job(i, name, arm):
        turns.take(i)
        try:
            run(i, name, arm)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
        finally:
            turns.give(i, finished=True)
    threads = [threading.Thread(target=job, args=(i, *item)) for i, item in enumerate(arms.items())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {name: curves[name] for name in arms}


class Turns:
    """Threads that take turns: one runs until pause(), which hands the turn to the next thread
    that has not finished and waits for its own turn to come back."""

    def __init__(self, n):
        self.cond, self.turn, self.finished = threading.Condition(), 0, [False] * n

    def take(self, i):
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def give(self, i, finished=False):
        with self.cond:
            self.finished[i] = self.finished[i] or finished
            n = len(self.finished)
            self.turn = next(((i + j) % n for j in range(1, n + 1) if not self.finished[(i + j) % n]), i)
            self.cond.notify_all()

    def pause(self, i):
        self.give(i)
        self.take(i)


def train_flops(cfg):
    """Analytic FLOPs of one training step of cfg's one-frame (image) clips (step_flops): the batch
    in its stage ratio, stage k's images at (side / 2^k / patch)^2 tokens, each with the text tokens
    of the longest caption (a group's text is padded to it: a group of 8 or more almost always holds
    one). Video clips (history) are not counted: only the image experiments use it."""
    if cfg.frames != 1:
        return float("nan")
    dcfg = config.dit_config(cfg, in_channels=4)
    side = cfg.size // (vae_module.VAE_SIZES[cfg.vae_size].spatial_factor if cfg.vae_ckpt or cfg.vae_steps else 1)
    ratio = [int(r) for r in cfg.stage_ratio.split(",")][::-1]  # index k
    per = cfg.batch_size // sum(ratio)
    L = max(len(c.split()) for c in data.SHAPE_CAPTIONS)
    sequences = [(L, (side // 2 ** k // dcfg.patch_size) ** 2) for k, r in enumerate(ratio) for _ in range(r * per)]
    return step_flops(dcfg.width, dcfg.depth, sequences)


def tokens_per_clip(cfg):
    """Tokens the DiT sees for one training sample of a video clip of cfg.frames frames: the whole
    clip for the full sequence; for the pyramid the mean over AR positions i (uniform) and stages
    (in the stage ratio) of the current frame plus its compressed history (pf.pyramid_tokens)."""
    latent = cfg.vae_ckpt or cfg.vae_steps > 0  # the tiny recipe's VAE (vae_size), or pixels
    factors = vae_module.VAE_SIZES[cfg.vae_size] if latent else None
    side = cfg.size // (factors.spatial_factor if latent else 1)
    T = 1 + (cfg.frames - 1) // (factors.temporal_factor if latent else 1)
    patch = cfg.patch or dit.SIZES[cfg.model].patch_size
    if cfg.full_sequence:
        return pf.full_sequence_tokens(side, side, T, patch)
    ratio = [int(r) for r in cfg.stage_ratio.split(",")]  # lowest resolution first
    per_stage = [sum(pf.pyramid_tokens(side, side, i + 1, k, cfg.K, patch) for i in range(T)) / T
                 for k in range(cfg.K - 1, -1, -1)]
    return sum(r * n for r, n in zip(ratio, per_stage)) / sum(ratio)


def step_flops(width, depth, sequences):
    """Analytic training FLOPs of the MM-DiT blocks for sequences [(text tokens, video tokens), ...]:
    forward + backward = 3 forwards; a forward makes 2 FLOPs a multiply-add, per token 12 D^2 of
    them (qkv 3, output projection 1, MLP 8) and per sequence of S tokens 2 S^2 D (q k^T and the
    weighted sum of values). Embedders, norms and the final layer (a few % here) are left out."""
    return 3 * depth * sum(2 * (12 * width ** 2 * (L + N) + 2 * (L + N) ** 2 * width) for L, N in sequences)


def series(curves, axis, key):
    """{arm: (steps or seconds, that score)} of each curve, for a "curves" panel of plot."""
    return {name: (c[axis], [s[key] for s in c["scores"]]) for name, c in curves.items()}


def value_at(curve, key, when, axis="steps"):
    """The score of the last evaluation at or before `when` on `axis` (steps or seconds); None if none."""
    seen = [s[key] for x, s in zip(curve[axis], curve["scores"]) if x <= when]
    return seen[-1] if seen else None


def first_reaching(curve, key, target, higher_is_better=True, axis="steps"):
    """The first `axis` value (steps or seconds) at which the curve's score reaches `target`; None if never."""
    for x, s in zip(curve[axis], curve["scores"]):
        if (s[key] >= target) if higher_is_better else (s[key] <= target):
            return x
    return None


def print_table(headers, rows):
    """A plain aligned table; floats with 3 decimals, None as '-'."""
    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[j]) for r in cells)) for j, h in enumerate(headers)]
    print("  ".join(h.ljust(w) if j == 0 else h.rjust(w) for j, (h, w) in enumerate(zip(headers, widths))))
    for r in cells:
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))


def thumbnails(videos, cols=8):
    """The first frame and the last of each video side by side (images: the image), tiled:
    [rows H, cols W', 3] in [0, 1]."""
    ends = videos[:, :, :1] if videos.shape[2] == 1 else \
        torch.cat([videos[:, :, 0], videos[:, :, -1]], dim=-1)[:, :, None]  # [B, 3, 1, H, 2W]
    grid = common.tile(ends, cols)[:, 0]                                      # [3, rows H, cols 2W]
    return ((grid.permute(1, 2, 0).float() + 1) / 2).clamp(0, 1).numpy()


def plot(path, panels, title=""):
    """A row of panels into a PNG: ("curves", title, xlabel, ylabel, {label: (xs, ys)}) or
    ("image", title, array [H, W, 3] in [0, 1]). matplotlib is optional: without it, one line says so."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no PNG ({path}): matplotlib is missing; pip install matplotlib")
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (kind, name, *rest) in zip(axes[0], panels):
        ax.set_title(name, fontsize=9)
        if kind == "image":
            ax.imshow(rest[0], interpolation="nearest")
            ax.axis("off")
            continue
        xlabel, ylabel, lines = rest
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
