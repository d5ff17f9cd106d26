"""
Teach the quick start a colour it never saw, cyan (pure (0, 1, 1)), with LoRA adapters (lora.py):
the base frozen, a file of 2 MB (adapters, their EMA and AdamW moments), the 48 captions it knew kept; then the same
fine-tuning of all weights beside it (issue 28).

    python toy/lora.py --ckpt=out/tiny/ckpt.pt [--out_dir=out/lora] [--steps=500] [--rank=8] [--vae_steps=200]

Data: clips of the 12 cyan captions (`--colours=cyan` of the shapes data, toy/data.py) and, with
--replay=N (default 1), N clips of each of the 48 known captions, as many as the cyan ones. The shipped
toy VAE never saw cyan either, and it is too small to draw a colour it never saw: its encoder maps a
cyan object to yellow-green, and latents found by inverting its decoder sit far from the latents the
DiT knows (std 1.8 against 1.0) and decode to cyan only just. So the VAE is taught cyan first
(`teach_vae`, --vae_steps): fine-tuned on clips of all five colours, its latents of the four known
colours held to the shipped encoder's, so the base DiT's latents keep their meaning; written to
out_dir/vae_cyan.pt and timed apart, as the "data preparation" of this run (a real VAE encodes any
colour: the toy's shortcoming, not LoRA's). Each fine-tuning is train.py's loop on the latents of
that VAE (--lora_rank=R, or all weights), in a child process of its own (its peak memory is its own);
samples are decoded by it too (`python sample.py --vae_ckpt=out_dir/vae_cyan.pt --lora=...`).
Scores (toy/evaluate.py, the palette with cyan): the 12 cyan captions x 4 seeds, and the 48
original captions with the adapter applied. Ends with one line `lora: ...` per method. Writes
the adapter out_dir/lora/ckpt.pt and assets/lora_cyan.gif: the cyan captions sampled by the base
(top), with the adapter (middle) and fully fine-tuned (bottom).
"""
import copy
import dataclasses
import json
import multiprocessing as mp
import os
import resource
import sys
import time

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import lora  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from common import (boolean, key_values, load_vae, number, read_checkpoint, save_torch, tile,  # noqa: E402
                    write_video)
from toy import data, evaluate  # noqa: E402
from vae import vae_loss  # noqa: E402

OPTIONS = dict(ckpt=os.path.join("out", "tiny", "ckpt.pt"), out_dir=os.path.join("out", "lora"), steps=500,
               rank=8, lr=3e-3, full_lr=5e-4, clips=1, vae_steps=200, replay=1, seeds=4, full=True, picture=True)
KEYS = ("colour", "shape", "direction")
ANCHOR = 10.0  # weight of the known colours' latents against the shipped encoder's (teach_vae)
CYAN_SEED, KNOWN_SEED = 1000, 1234  # sampling seeds of the evaluations: cyan seed s is CYAN_SEED + s


def teach_vae(vae, steps, size, frames, batch=16, lr=3e-4, seed=0, anchor=None):
    """The VAE, taught cyan: `steps` of its loss (vae.vae_loss with the shipped recipe's pixel loss
    and KL weight) on half cyan, half known-colour clips, plus `anchor` (default ANCHOR) x the mean
    squared distance of the known clips' latents (posterior means) from the shipped encoder's,
    divided by the mean squared latent scale. Returns the taught copy, frozen."""
    anchor = ANCHOR if anchor is None else anchor
    recipe = vae.recipe  # the shipped VAE's loss
    kl_weight = recipe.get("kl_weight", config.Config.kl_weight)
    pixel = recipe.get("pixel_loss", config.Config.pixel_loss)
    taught = copy.deepcopy(vae).train().requires_grad_(True)
    opt = torch.optim.Adam(taught.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="teaching the VAE cyan", leave=False):
        cyan, _ = data.shapes_batch(batch // 2, frames=frames, size=size, generator=g, colours=("cyan",))
        known, _ = data.shapes_batch(batch // 2, frames=frames, size=size, generator=g)
        x = torch.cat([cyan, known])                                          # [B, 3, T, H, W]
        recon, mean, logvar = taught(x, generator=g)
        loss, _ = vae_loss(x, recon, mean, logvar, kl_weight, pixel)
        with torch.no_grad():
            shipped, _ = vae.posterior(known)
        held = (mean[batch // 2:] - shipped).square().mean() / vae.latent_scale.square().mean()
        opt.zero_grad()
        (loss + anchor * held).backward()
        opt.step()
    return taught.eval().requires_grad_(False)


def encode(vae, video):
    """Clips [N, 3, T, H, W] -> their normalised latents [N, C, T, h, w]."""
    with torch.no_grad():
        return vae.normalize(vae.encode(video))


class PoolVideo(train.Video):
    """train.py's Video task on a data set given as a file of latents (the cyan and replayed clips)."""
    POOL = ""

    def make_pool(self, device):
        pool = torch.load(self.POOL, weights_only=True)
        return pool["latents"].to(device), pool["captions"]


def finetune(cfg, pool_path, result_path):
    """One fine-tuning run (a child process): train.py's loop on the pool; writes its time and peak memory."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    PoolVideo.POOL = pool_path
    train.TASKS["video"] = PoolVideo
    t0 = time.time()
    train.train(cfg, quiet=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB -> MB
    with open(result_path, "w") as f:
        json.dump(dict(seconds=time.time() - t0, peak_mb=peak), f)


def scores(net, cfg, vae, captions, seed):
    videos = sample.generate(net, captions, cfg, cfg["frames"], vae=vae, seed=seed, progress=False)
    s = evaluate.score_shapes(videos, captions, data.ALL_COLOURS)
    return {k: s[k] for k in KEYS}, videos


def evaluate_net(net, cfg, vae, n_seeds):
    cyan = data.shape_captions(("cyan",))
    runs = [scores(net, cfg, vae, cyan, CYAN_SEED + s) for s in range(n_seeds)]
    cyan_scores = {k: sum(r[0][k] for r in runs) / n_seeds for k in KEYS}
    old, _ = scores(net, cfg, vae, data.SHAPE_CAPTIONS, KNOWN_SEED)
    return cyan_scores, old, runs[0][1]


def main(argv):
    o = dict(OPTIONS)
    for key, value in key_values(argv, "python toy/lora.py --ckpt=PATH [--out_dir=DIR] [--steps=N] ..."):
        if key not in o:
            sys.exit(f"error: unknown option --{key} (options: {', '.join(o)})")
        o[key] = (boolean(key, value) if isinstance(o[key], bool) else value if isinstance(o[key], str)
                  else number(key, value, type(o[key])))
    t_start = time.time()
    base = read_checkpoint(o["ckpt"], "pyramid-flow", "video checkpoint", " (python train.py)", mmap=True)
    base_cfg = config.Config(**{k: v for k, v in base["config"].items() if k in config.Config.__dataclass_fields__})
    os.makedirs(o["out_dir"], exist_ok=True)

    # the data: the VAE taught cyan (once for these settings), then the latents of its clips
    vae_path = os.path.join(o["out_dir"], "vae_cyan.pt")
    t0 = time.time()
    shipped = load_vae(base_cfg.vae_ckpt)
    how = dict(steps=o["vae_steps"], anchor=ANCHOR, base=base_cfg.vae_ckpt)
    reused = os.path.exists(vae_path) and read_checkpoint(vae_path, "causal-vae", "VAE checkpoint").get(
        "recipe", {}).get("taught_cyan") == how
    if not reused:
        taught = teach_vae(shipped, o["vae_steps"], base_cfg.size, base_cfg.frames)
        save_torch(vae_path, dict(kind="causal-vae", config=dataclasses.asdict(taught.cfg), model=taught.state_dict(),
                                  recipe=dict(shipped.recipe, taught_cyan=how)))
    vae = load_vae(vae_path)
    cyan_captions = data.shape_captions(("cyan",)) * o["clips"]
    clips = lambda captions, seed: data.shapes_batch(len(captions), base_cfg.frames, base_cfg.size,  # noqa: E731
                                                     generator=seed, captions=captions)[0]
    cyan_video = clips(cyan_captions, 0)
    z = encode(vae, cyan_video)
    with torch.no_grad():  # how faithfully the taught VAE draws cyan
        rec = evaluate.score_shapes(vae.decode(vae.denormalize(z)).clamp(-1, 1), cyan_captions, data.ALL_COLOURS)
    known = data.SHAPE_CAPTIONS * o["replay"]
    known_z, drift = z[:0], ""
    if known:
        known_video = clips(known, 1)
        known_z = encode(vae, known_video)
        moved = (known_z - encode(shipped, known_video)).square().mean().sqrt()
        drift = f"; the known clips' latents moved {moved:.3f} (rms, normalised)"
    prep = time.time() - t0
    print(f"the VAE taught cyan ({vae_path}, {o['vae_steps']} steps{', reused' if reused else ''}): "
          f"{len(cyan_captions)} cyan clips decode with " + ", ".join(f"{k} {rec[k]:.2f}" for k in KEYS)
          + f", latent std {z.std():.2f}{drift}; {prep:.0f}s", flush=True)
    times = max(1, len(known) // len(cyan_captions))  # as many cyan clips as known ones
    pool = dict(latents=torch.cat([z.repeat(times, 1, 1, 1, 1), known_z]), captions=cyan_captions * times + known)
    pool_path = os.path.join(o["out_dir"], "pool.pt")
    save_torch(pool_path, pool)
    n_pool = len(pool["captions"])

    common = dict(init_from=o["ckpt"], max_steps=o["steps"], warmup_steps=min(20, o["steps"]), lr_decay="cosine",
                  data_pool=n_pool, colours=",".join(data.ALL_COLOURS if o["replay"] else ["cyan"]), eval_captions=0,
                  overwrite=True, resume=False, log_every=50, save_every=0, phase=0, vae_ckpt=vae_path)
    runs = dict(lora=dict(common, lr=o["lr"], lora_rank=o["rank"], out_dir=os.path.join(o["out_dir"], "lora")))
    if o["full"]:
        runs["full"] = dict(common, lr=o["full_lr"], out_dir=os.path.join(o["out_dir"], "full"))
    # every row decoded by the taught VAE: the rows differ in the DiT only
    net, cfg, _ = sample.load(o["ckpt"])
    n_base = sum(p.numel() for p in net.parameters())
    before, before_old, base_videos = evaluate_net(net, cfg, vae, 1)
    rows, pictures = {}, [base_videos]
    ctx = mp.get_context("spawn")
    for name, settings in runs.items():
        run_cfg = dataclasses.replace(base_cfg, **settings)
        result = os.path.join(run_cfg.out_dir, "time.json")
        os.makedirs(run_cfg.out_dir, exist_ok=True)
        child = ctx.Process(target=finetune, args=(run_cfg, pool_path, result))
        child.start()
        child.join()
        if child.exitcode:
            sys.exit(f"error: the {name} fine-tuning failed (exit code {child.exitcode})")
        with open(result) as f:
            took = json.load(f)
        ckpt = os.path.join(run_cfg.out_dir, "ckpt.pt")
        net, cfg, _ = sample.load(o["ckpt"] if name == "lora" else ckpt)
        if name == "lora":
            lora.apply_files(net, ckpt, o["ckpt"])
            trained = sum(v.numel() for v in torch.load(ckpt, weights_only=True)["ema"].values())
        else:
            trained = n_base
        cyan, old, videos = evaluate_net(net, cfg, vae, o["seeds"])
        pictures.append(videos)
        rows[name] = (took, trained, os.path.getsize(ckpt), cyan, old)
    if o["picture"]:
        path = os.path.join(ROOT, "assets", "lora_cyan.gif")
        write_video(path, tile(torch.cat(pictures), cols=12))
        print(f"wrote {path}: the 12 cyan captions (seed {CYAN_SEED}) by the base, with the adapter"
              + (", fully fine-tuned" if o["full"] else "") + " (rows)")
    print(f"base {o['ckpt']} (decoded by the taught VAE): {n_base:,} parameters; cyan x1 seed: "
          + ", ".join(f"{k} {before[k]:.2f}" for k in KEYS)
          + "; the 48 original captions: " + ", ".join(f"{k} {before_old[k]:.2f}" for k in KEYS))
    print(f"data preparation (the VAE taught cyan{', reused' if reused else ''}, {vae_path}): {prep:.0f}s; "
          f"{os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads; the whole script {time.time() - t_start:.0f}s")
    for name, (took, trained, size, cyan, old) in rows.items():
        print(f"{name}: {took['seconds']:.0f}s for {o['steps']} steps, peak memory {took['peak_mb']:.0f} MB, "
              f"{trained:,} trained parameters ({100 * trained / n_base:.1f}% of the base), file "
              f"{size / 1e3:.0f} kB; cyan x{o['seeds']} seeds: " + ", ".join(f"{k} {cyan[k]:.2f}" for k in KEYS)
              + "; the 48 original captions: " + ", ".join(f"{k} {old[k]:.2f}" for k in KEYS))


if __name__ == "__main__":
    main(sys.argv[1:])
