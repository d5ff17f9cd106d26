"""
The 2-D toy of App. C.4 (Fig. 13) as a task of train.py (`python train.py --preset=toy2d`): a few
points on a ring as data, Gaussian noise, K piecewise windows, and a small MLP velocity field.
In 2-D there is no pixel grid, so Up and Down are the identity (`spatial=False`): the pyramid only
splits time into windows, and the coupling of the endpoint noise (Eqs. 9-10) is what varies.
toy/coupling.py trains both couplings and compares their flows. Tensor legend: points [B, 2].
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import pyramid_flow as pf

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
    """The task (train.py's contract): batches of points on a path of a uniformly drawn stage."""

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
