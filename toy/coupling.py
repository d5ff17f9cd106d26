"""
App. C.4 / Fig. 13 at laptop scale: does coupling the endpoint noise (Eqs. 9-10) straighten the
piecewise flow? Trains the 2-D velocity field of `train.py --preset=toy2d` twice, with coupled and
with independent endpoint noise (out/toy2d/coupled and out/toy2d/independent), and compares the
two on the same noise seeds:

  straightness  mean over trajectories and Euler steps of |v(x) - chord|^2, where chord is the
                trajectory's own displacement over the stage (the velocity of a straight path);
                0 for perfectly straight stages.
  crossings     pairs of trajectories whose planar paths intersect inside a stage, summed over
                stages (the flow's paths never meet in (x, t), but crossing in the plane is what
                makes a velocity field curved).

    python toy/coupling.py [--key=value ...]   # about a minute; prints both numbers, writes trajectories.png
    python toy/coupling.py --quick             # 50 steps each, seconds (the tests run it)

Extra --key=value settings go to both training runs (train.py's Config).
"""
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import config  # noqa: E402
import pyramid_flow as pf  # noqa: E402
import train  # noqa: E402
from toy import toy2d  # noqa: E402

N_TRAJ = 128          # trajectories per model
STEPS = 40            # Euler steps per stage (fine, so the paths are the field's own)
CROSS_SEGMENTS = 10   # segments per stage kept for the crossing count (coarse polyline)


def load(path):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    cfg = config.Config(**ck["config"])
    task = toy2d.Toy2D(cfg)
    model = task.model()
    model.load_state_dict(ck["ema"])
    return model.eval(), task


@torch.no_grad()
def trajectories(model, windows, seed=0):
    """Per stage (sampling order, lowest first): positions [STEPS + 1, N, 2] and velocities [STEPS, N, 2]."""
    stages = []

    def velocity(x, k, t):
        v = model.velocity(x, torch.full((x.shape[0],), pf.model_time(k, t, windows)))
        if t == 0:  # a new stage begins
            stages.append(dict(k=k, xs=[x.clone()], vs=[]))
        stages[-1]["vs"].append(v)
        stages[-1]["xs"].append(x + v / STEPS)
        return v

    g = torch.Generator().manual_seed(seed)
    pf.sample(velocity, (N_TRAJ, 2), windows, STEPS, generator=g, spatial=False)
    return [(st["k"], torch.stack(st["xs"]), torch.stack(st["vs"])) for st in stages]


def straightness(stages):
    gaps = []
    for _, xs, vs in stages:
        # the stage's straight-path velocity (local time)
        chord = xs[-1] - xs[0]
        gaps.append((vs - chord).pow(2).sum(-1).mean())
    return torch.stack(gaps).mean().item()


def count_crossings(xs):
    """Pairs of trajectories (columns of xs [S + 1, N, 2]) whose polylines intersect."""
    idx = torch.linspace(0, xs.shape[0] - 1, CROSS_SEGMENTS + 1).round().long()
    p = xs[idx]                                       # [S + 1, N, 2], a coarser polyline
    a, b = p[:-1].reshape(-1, 2), p[1:].reshape(-1, 2)  # segments [S * N, 2]
    owner = torch.arange(p.shape[1]).repeat(CROSS_SEGMENTS)

    def orient(p, q, r):  # sign of the turn p -> q -> r, broadcast over pairs
        return torch.sign((q[..., 0] - p[..., 0]) * (r[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (r[..., 0] - p[..., 0]))
    A, B, C, D = a[:, None], b[:, None], a[None], b[None]
    hit = (orient(A, B, C) * orient(A, B, D) < 0) & (orient(C, D, A) * orient(C, D, B) < 0)
    hit &= owner[:, None] < owner[None, :]           # different trajectories, each pair once
    pairs = torch.zeros(p.shape[1], p.shape[1], dtype=torch.bool)
    i, j = hit.nonzero(as_tuple=True)
    pairs[owner[i], owner[j]] = True
    return int(pairs.sum())


def draw(panels, path, size=360):
    """Side-by-side trajectory plots with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw
    colours = [(230, 80, 60), (60, 160, 90), (60, 110, 230), (170, 90, 200)]  # by stage k
    img = Image.new("RGB", (size * len(panels), size + 40), "white")
    d = ImageDraw.Draw(img)
    scale = size / 8  # the plane [-4, 4]^2

    def px(x, col):
        return [(col * size + size / 2 + float(u) * scale, size / 2 + 20 - float(v) * scale) for u, v in x]
    for col, (title, stages, points) in enumerate(panels):
        d.text((col * size + 8, 4), title, fill="black")
        for k, xs, _ in stages:
            for n in range(xs.shape[1]):
                d.line(px(xs[:, n], col), fill=colours[k % 4], width=1)
        for x, y in px(points, col):
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill="black")
    d.text((8, size + 22), "stage colours: red = k0 (last), green = k1, blue = k2 (first); black = data points",
           fill="black")
    common.atomic_write(path, img.save)


def compare(base="out/toy2d"):
    rows, panels = [], []
    for name in ("coupled", "independent"):
        model, task = load(os.path.join(base, name, "ckpt.pt"))
        stages = trajectories(model, task.windows)
        s = straightness(stages)
        c = sum(count_crossings(xs) for _, xs, _ in stages)
        rows.append((name, s, c))
        panels.append((f"{name}: straightness {s:.3f}, crossings {c}", stages, task.points))
    print(f"{'noise':<12} {'straightness':>12} {'crossings':>10}   ({N_TRAJ} trajectories, K = {len(task.windows)})")
    for name, s, c in rows:
        print(f"{name:<12} {s:>12.4f} {c:>10d}")
    path = os.path.join(base, "trajectories.png")
    draw(panels, path)
    print(f"wrote {path}")
    return rows


def main(argv):
    """Train both couplings with the same settings and seed, then compare them."""
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"] + (["--max_steps=50"] if quick else [])
    cfg = config.parse_args(["--preset=toy2d", *argv])
    base = config.run_dir(cfg)
    for coupling in ("coupled", "independent"):
        train.train(dataclasses.replace(cfg, coupling=coupling, out_dir=os.path.join(base, coupling)))
    return compare(base)


if __name__ == "__main__":
    main(sys.argv[1:])
