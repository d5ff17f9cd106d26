"""
Measure the laptop quick start against its targets: wall time, peak memory and the
caption-following scores of `python train.py --preset=tiny` (issue: at most 10 minutes on a 2-core
CPU, peak memory under 2 GB, >= 95% colour, 90% shape and 90% direction accuracy on all 48
captions, the object keeping its size: "size kept" is the share of videos whose object's area
stays within 20% of the first frame's in every frame; "consistency" also asks for the same colour
and shape in every frame).

    python toy/measure_tiny.py [--key=value ...]     # extra settings are passed to train.py

It runs the preset in a child process (into out/measure_tiny, or the --out_dir given, whose
checkpoint it replaces) and prints one table; the text-to-video scores are those the preset
writes to report.json (toy/evaluate.py). The image-to-video rows are measured here, after the
run (not in its time): the first frame of a real clip of each caption is given, the checkpoint
continues it, and the videos are scored the same way (the given frame is written back unchanged
by sample.generate, so only the continuation is judged).
"""
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_to_video_scores(ckpt, seed=1234):
    """Scores of image-to-video on the 48 captions (sample.generate writes the given frame back as is)."""
    sys.path.insert(0, ROOT)
    import sample
    from toy import data, evaluate
    net, cfg, vae = sample.load(ckpt)
    captions = data.SHAPE_CAPTIONS
    clips, _ = data.shapes_batch(len(captions), frames=cfg["frames"], size=cfg["size"], generator=seed,
                                 captions=captions)                        # [48, 3, F, H, W]
    videos = sample.generate(net, captions, cfg, cfg["frames"], vae=vae, seed=seed, prefix=clips[:, :, :1],
                             progress=False)
    return evaluate.score_shapes(videos, captions)


def split_out_dir(extra):
    """(out_dir, the other settings): the run's folder is read back here, so it must be given as
    --out_dir=PATH (or --out-dir=PATH), not as two words."""
    out_dir, rest = os.path.join("out", "measure_tiny"), []
    for arg in extra:
        key, eq, value = arg.partition("=")
        if key.replace("-", "_") != "__out_dir":
            rest.append(arg)
        elif not eq or not value:
            sys.exit(f"error: give the folder as --out_dir=PATH, got {arg!r}")
        else:
            out_dir = value
    return out_dir, rest


def main(extra):
    out_dir, extra = split_out_dir(extra)
    cmd = [sys.executable, "train.py", "--preset=tiny", f"--out_dir={out_dir}", "--overwrite=true", *extra]
    print("running:", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.time() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: kB
    with open(os.path.join(ROOT, out_dir, "report.json")) as f:
        scores = json.load(f)["scores"]
    rows = [("wall time", f"{wall / 60:.1f} min", "<= 10 min"),
            ("peak memory", f"{peak_mb / 1024:.2f} GB", "< 2 GB"),
            ("colour accuracy", f"{scores['colour']:.3f}", ">= 0.95"),
            ("shape accuracy", f"{scores['shape']:.3f}", ">= 0.90"),
            ("direction accuracy", f"{scores['direction']:.3f}", ">= 0.90"),
            ("size kept", f"{scores['size_kept']:.3f}", "object keeps its size"),
            ("mean largest area change", f"{scores['area_change']:.3f}", ""),
            ("consistency", f"{scores['consistency']:.3f}", "")]
    i2v = image_to_video_scores(os.path.join(ROOT, out_dir, "ckpt.pt"))
    rows += [("image-to-video: direction", f"{i2v['direction']:.3f}", "captioned motion"),
             ("image-to-video: shape", f"{i2v['shape']:.3f}", ""),
             ("image-to-video: size kept", f"{i2v['size_kept']:.3f}", ""),
             ("image-to-video: consistency", f"{i2v['consistency']:.3f}", "")]
    print(f"\n{'measure':<28}{'value':>12}   target   ({os.cpu_count()} CPUs)")
    for name, value, target in rows:
        print(f"{name:<28}{value:>12}   {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
