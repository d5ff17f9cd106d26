"""
Measure the laptop quick start against its targets: wall time, peak memory and the
caption-following scores of `python train.py --preset=tiny` (issue: at most 10 minutes on a 2-core
CPU, peak memory under 2 GB, >= 95% colour, 90% shape and 90% direction accuracy on all 48
captions, the object keeping its size).

    python toy/measure_tiny.py [--key=value ...]     # extra settings are passed to train.py

It runs the preset in a child process (into out/measure_tiny, replaced each time) and prints one
table; the scores are those the preset writes to report.json (toy/evaluate.py).
"""
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(extra):
    out_dir = os.path.join("out", "measure_tiny")
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
            ("consistency", f"{scores['consistency']:.3f}", "object keeps its size"),
            ("mean relative area change", f"{scores['area_change']:.3f}", "")]
    print(f"\n{'measure':<28}{'value':>12}   target   ({os.cpu_count()} CPUs)")
    for name, value, target in rows:
        print(f"{name:<28}{value:>12}   {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
