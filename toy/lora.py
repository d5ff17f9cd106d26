"""
Teach the quick start a colour it never saw, cyan (pure (0, 1, 1)), with LoRA adapters (lora.py):
the base frozen, a file of a few hundred kB, and the 48 captions it knew kept; then the same
fine-tuning of all weights beside it (issue 28).

    python toy/lora.py --ckpt=out/tiny/ckpt.pt [--out_dir=out/lora] [--steps=300] [--rank=4] [--full=true]

Data: clips of the 12 cyan captions (`--colours=cyan` of the shapes data, toy/data.py) and, with
--replay=N (default 1), N clips of each of the 48 known captions, as many as the cyan ones. The shipped
toy VAE never saw cyan either: its encoder maps a cyan object to yellow-green, but its decoder can
draw cyan. So the latents of the cyan clips are found by inverting the decoder (Adam on the latent,
from the encoder's, against the clip; `--invert_steps`), once, and kept in out_dir/cyan_pool.pt:
the "data preparation" of this run, timed apart. Each fine-tuning is train.py's loop on that pool
(--lora_rank=R, or all weights), in a child process of its own (its peak memory is its own).
Scores (toy/evaluate.py, the palette with cyan): the 12 cyan captions x 4 seeds, and the 48
original captions with the adapter applied. Ends with one line `lora: ...` per method. Writes
the adapter out_dir/lora/ckpt.pt and assets/lora_cyan.gif: the cyan captions sampled by the base
(top), with the adapter (middle) and fully fine-tuned (bottom).
"""
import dataclasses
import json
import multiprocessing as mp
import os
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config  # noqa: E402
import lora  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from common import key_values, load_vae, read_checkpoint, save_torch, tile, write_video  # noqa: E402
from toy import data, evaluate  # noqa: E402

OPTIONS = dict(ckpt=os.path.join("out", "tiny", "ckpt.pt"), out_dir=os.path.join("out", "lora"), steps=500,
               rank=8, lr=3e-3, full_lr=5e-4, clips=1, invert_steps=100, replay=1, seeds=4, full=True, picture=True)
KEYS = ("colour", "shape", "direction")


def cyan_pool(vae, per_caption, steps, size, frames, seed=0):
    """(latents [N, C, T, h, w] normalised, captions) of `per_caption` clips of each cyan caption,
    the latents found by inverting the VAE's decoder: min_z |decode(z) - clip|^2 from the encoder's z."""
    captions = data.shape_captions(("cyan",)) * per_caption
    video, _ = data.shapes_batch(len(captions), frames=frames, size=size, generator=seed, captions=captions)
    vae.requires_grad_(False)
    with torch.no_grad():
        z = vae.normalize(vae.encode(video))
    z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        loss = (vae.decode(vae.denormalize(z)) - video).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        decoded = vae.decode(vae.denormalize(z)).clamp(-1, 1)
    score = evaluate.score_shapes(decoded, captions, data.ALL_COLOURS)
    return z.detach(), captions, score


class PoolVideo(train.Video):
    """train.py's Video task on a data set given as a file of latents (the inverted cyan clips)."""
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
    runs = [scores(net, cfg, vae, cyan, 1000 + s) for s in range(n_seeds)]
    cyan_scores = {k: sum(r[0][k] for r in runs) / n_seeds for k in KEYS}
    old, _ = scores(net, cfg, vae, data.SHAPE_CAPTIONS, 1234)
    return cyan_scores, old, runs[0][1]


def main(argv):
    o = dict(OPTIONS)
    for key, value in key_values(argv, "python toy/lora.py --ckpt=PATH [--out_dir=DIR] [--steps=N] ..."):
        if key not in o:
            sys.exit(f"error: unknown option --{key} (options: {', '.join(o)})")
        o[key] = type(o[key])(value) if not isinstance(o[key], bool) else value.lower() in ("1", "true", "yes")
    t_start = time.time()
    base = read_checkpoint(o["ckpt"], "pyramid-flow", "video checkpoint", " (python train.py)", mmap=True)
    base_cfg = config.Config(**{k: v for k, v in base["config"].items() if k in config.Config.__dataclass_fields__})
    os.makedirs(o["out_dir"], exist_ok=True)

    # the data: inverted cyan latents, once
    pool_path = os.path.join(o["out_dir"], "cyan_pool.pt")
    t0 = time.time()
    vae = load_vae(base_cfg.vae_ckpt)
    if not os.path.exists(pool_path):
        z, captions, rec = cyan_pool(vae, o["clips"], o["invert_steps"], base_cfg.size, base_cfg.frames)
        save_torch(pool_path, dict(latents=z, captions=captions, decoded_scores={k: rec[k] for k in KEYS}))
        print(f"cyan data set: {len(captions)} clips, decoder inverted in {time.time() - t0:.0f}s; their decoded "
              f"latents score " + ", ".join(f"{k} {rec[k]:.2f}" for k in KEYS), flush=True)
    prep, cyan_path = time.time() - t0, pool_path
    pool = torch.load(pool_path, weights_only=True)
    if o["replay"]:  # clips of the 48 known captions beside the cyan ones, half and half
        known = data.SHAPE_CAPTIONS * o["replay"]
        video, _ = data.shapes_batch(len(known), base_cfg.frames, base_cfg.size, generator=1, captions=known)
        with torch.no_grad():
            known_latents = vae.normalize(vae.encode(video))
        times = max(1, len(known) // len(pool["captions"]))
        pool = dict(latents=torch.cat([pool["latents"].repeat(times, 1, 1, 1, 1), known_latents]),
                    captions=pool["captions"] * times + known)
    pool_path = os.path.join(o["out_dir"], "pool.pt")
    save_torch(pool_path, pool)
    n_pool = len(pool["captions"])

    common = dict(init_from=o["ckpt"], max_steps=o["steps"], warmup_steps=min(20, o["steps"]), lr_decay="cosine",
                  data_pool=n_pool, colours=",".join(data.ALL_COLOURS if o["replay"] else ["cyan"]), eval_captions=0, overwrite=True, resume=False, log_every=50,
                  save_every=0, phase=0)
    runs = dict(lora=dict(common, lr=o["lr"], lora_rank=o["rank"], out_dir=os.path.join(o["out_dir"], "lora")))
    if o["full"]:
        runs["full"] = dict(common, lr=o["full_lr"], out_dir=os.path.join(o["out_dir"], "full"))
    net, cfg, vae = sample.load(o["ckpt"])
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
        if name == "lora":
            net, cfg, vae = sample.load(o["ckpt"])
            lora.apply_files(net, ckpt, o["ckpt"])
            trained = sum(v.numel() for v in torch.load(ckpt, weights_only=True)["ema"].values())
        else:
            net, cfg, vae = sample.load(ckpt)
            trained = n_base
        cyan, old, videos = evaluate_net(net, cfg, vae, o["seeds"])
        pictures.append(videos)
        rows[name] = (took, trained, os.path.getsize(ckpt), cyan, old)
    if o["picture"]:
        path = os.path.join(ROOT, "assets", "lora_cyan.gif")
        write_video(path, tile(torch.cat(pictures), cols=12))
        print(f"wrote {path}: the 12 cyan captions (seed 1000) by the base, with the adapter"
              + (", fully fine-tuned" if o["full"] else "") + " (rows)")
    print(f"base {o['ckpt']}: {n_base:,} parameters; cyan x1 seed: " + ", ".join(f"{k} {before[k]:.2f}" for k in KEYS)
          + "; the 48 original captions: " + ", ".join(f"{k} {before_old[k]:.2f}" for k in KEYS))
    print(f"data preparation (decoder inversion, once, in {cyan_path}): {prep:.0f}s; {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads; the whole script {time.time() - t_start:.0f}s")
    for name, (took, trained, size, cyan, old) in rows.items():
        print(f"{name}: {took['seconds']:.0f}s for {o['steps']} steps, peak memory {took['peak_mb']:.0f} MB, "
              f"{trained:,} trained parameters ({100 * trained / n_base:.1f}% of the base), file "
              f"{size / 1e3:.0f} kB; cyan x{o['seeds']} seeds: " + ", ".join(f"{k} {cyan[k]:.2f}" for k in KEYS)
              + "; the 48 original captions: " + ", ".join(f"{k} {old[k]:.2f}" for k in KEYS))


if __name__ == "__main__":
    main(sys.argv[1:])
