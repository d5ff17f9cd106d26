"""
Re-make the quick start's VAE and compare it with the one the repository ships (assets/vae_tiny.pt).

The quick start (`python train.py`) trains its video model on the latents of a toy causal VAE.
Training that VAE took a third of the run, and it comes out the same every time (0.62M parameters,
seeded, CPU), so the repository ships it and the quick start spends its minutes on the video model.
This script trains it again exactly as `python train.py --vae_ckpt=` would in its first phase (the
vae-toy recipe shortened to the preset's vae_steps, with its kl_weight and clip length), then
prints both side by side: the recipe, the held-out PSNR, the scores of the reconstructions, and the
largest weight difference.

    python toy/make_vae.py            # 2-4 minutes on 2 cores; writes out/make_vae/vae/vae.pt
    python toy/make_vae.py --ship     # then copies it to assets/vae_tiny.pt (maintainers)

Weights agree bit for bit on the same CPU kind, thread count and torch version; elsewhere float
sums may round differently, so "the same" here means: the same recipe, PSNR within 0.2 dB, and
reconstructions that score alike.
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import config  # noqa: E402
import train  # noqa: E402

OUT = os.path.join("out", "make_vae")
PSNR_TOLERANCE = 0.2  # dB


def quick_start_vae_config(out_dir=OUT, **kw):
    """The settings of the quick start's VAE phase, as `python train.py --vae_ckpt=` runs it."""
    cfg = config.parse_args(["--preset=tiny", "--vae_ckpt=", f"--out_dir={out_dir}", *[f"--{k}={v}" for k, v in kw.items()]])
    return config.vae_phase(cfg)


def compare(made, shipped):
    """(rows of (what, made, shipped), same?) for two VAE checkpoints."""
    a = common.read_checkpoint(made, "causal-vae", "VAE checkpoint")
    b = common.read_checkpoint(shipped, "causal-vae", "VAE checkpoint")
    diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in b["model"]) \
        if a["model"].keys() == b["model"].keys() else float("inf")
    rows = [("recipe (steps, data, seed, losses)", "same" if a["recipe"] == b["recipe"] else "differs", ""),
            ("held-out PSNR (dB)", f"{a['psnr']:.2f}", f"{b['psnr']:.2f}")]
    rows += [(f"reconstructions: {k}", f"{a['scores'].get(k, 0):.3f}", f"{v:.3f}") for k, v in b["scores"].items()]
    rows.append(("largest weight difference", f"{diff:.1e}", ""))
    same = a["recipe"] == b["recipe"] and abs(a["psnr"] - b["psnr"]) <= PSNR_TOLERANCE and a["scores"] == b["scores"]
    return rows, same


def main(argv):
    if argv not in ([], ["--ship"]):
        raise SystemExit(f"usage: python toy/make_vae.py [--ship], got {' '.join(argv)}")
    cfg = quick_start_vae_config()
    print(f"training the quick start's VAE: {cfg.max_steps} steps of the vae-toy recipe, kl_weight {cfg.kl_weight}, "
          f"into {cfg.out_dir}", flush=True)
    train.train(cfg)
    made = os.path.join(cfg.out_dir, "vae.pt")
    rows, same = compare(made, config.QUICK_START_VAE)
    print(f"\n{'':<36}{'made now':>12}{'shipped':>12}")
    for what, a, b in rows:
        print(f"{what:<36}{a:>12}{b:>12}")
    print(f"the same VAE as {os.path.relpath(config.QUICK_START_VAE, ROOT)}: {'yes' if same else 'no'}")
    if "--ship" in argv:
        common.atomic_write(config.QUICK_START_VAE, lambda tmp: shutil.copyfile(made, tmp))
        print(f"copied {made} to {config.QUICK_START_VAE}")


if __name__ == "__main__":
    main(sys.argv[1:])
