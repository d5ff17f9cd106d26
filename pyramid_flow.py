"""
Pyramidal flow matching: the method of Jin et al., ICLR 2025, Sec. 3.2-3.3 and App. A.

Plain functions on tensors, no parameters. Read it beside the paper:
  stage_windows ......... Sec. 3.2, the K time windows [s_k, e_k] and the jump rule below Eq. 15
  model_time ............ the network's stage-aware time input (windows overlap in t)
  down / up / down_noise  the Down(., 2^k) and Up(.) of Eqs. 5-10
  endpoints ............. Eqs. 9-10 (coupled start and end of a stage)
  training_example ...... Eqs. 6 and 11 (a point on the path and its regression target)
  corrective_noise ...... Eqs. 14 and 22 (block covariance: 1 on the diagonal, -1/3 off it)
  renoise ............... Eq. 15 (jump from stage k+1 to stage k)
  sample ................ Algorithm 1 (per-stage Euler, renoising at every jump)
  history_condition ..... Eqs. 16-17 (the temporal pyramid of the history frames)
  sample_video .......... Algorithm 1 inside the autoregressive loop over frames (Eq. 17)
  pyramid_tokens ........ Sec. 3.3 / 4.2 (token counts, 15,360 vs 119,040)

Conventions. Paper notation throughout: t = 0 is noise, t = 1 is data, x_t = t x1 + (1 - t) x0
(Eq. 3). Stage k = 0 is full resolution and k = K-1 the lowest; sampling runs k = K-1 -> 0.
(The authors' release uses the reverse, sigma = 1 - t and stage 0 = lowest: beware when comparing.)
Tensor legend: images / single frames [B, C, H, W], videos [B, C, T, H, W]; every resampling acts
on the last two dims, so both work. `spatial=False` makes Up and Down the identity, for data
without a pixel grid (the 2-D toy of App. C.4): the pyramid then only splits time into windows.
"""
import math

import torch


# -----------------------------------------------------------------------------
# Stage windows (Sec. 3.2)

def stage_windows(K):
    """[(s_k, e_k) for k = 0..K-1]: a uniform split of [0, 1] with each start rolled back.

    Stage k nominally covers [(K-1-k)/K, (K-k)/K]. Its end e_k is kept; its start s_k is moved
    back so that the jump from stage k+1 obeys e_{k+1} = 2 s_k / (1 + s_k) (below Eq. 15),
    i.e. s_k = e_{k+1} / (2 - e_{k+1}). K = 3 gives [(0.5, 1), (0.2, 2/3), (0, 1/3)].
    """
    if not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    ends = [(K - k) / K for k in range(K)]
    starts = [ends[k + 1] / (2 - ends[k + 1]) if k < K - 1 else 0.0 for k in range(K)]
    return list(zip(starts, ends))


def model_time(k, t, windows):
    """The network's time input for local time t in [0, 1] of stage k: a global time in [0, 1].

    The windows overlap in t, so t alone does not say which stage the model is in. We lay the
    stages end to end, lowest first, each taking a share of [0, 1] proportional to its length
    e_k - s_k: monotone over the whole pyramid trajectory and stage-aware (0 = pure noise, 1 =
    data, as in the paper). For K = 3 the stage boundaries fall at 0.256 and 0.615, the same
    split as the release's 1000 -> 744 -> 386 -> 0 on its reversed clock.
    """
    lengths = [e - s for s, e in windows]
    before = sum(lengths[k + 1:])  # stages K-1 .. k+1 come first
    return (before + t * lengths[k]) / sum(lengths)


# -----------------------------------------------------------------------------
# Resampling: Down and Up of Eqs. 5-10

def _check_halvable(x, levels):
    H, W = x.shape[-2:]
    f = 2 ** levels
    if H % f or W % f:
        raise ValueError(f"spatial size {H}x{W} cannot be halved {levels} times "
                         f"(needs multiples of {f}); pick sizes divisible by 2^(K-1)")


def down(x, levels=1):
    """Data downsampling Down(x, 2^levels): 2x2 average pooling per level on the last two dims.

    Average pooling by 2 equals bilinear halving; no rescale, so a clean image stays an image.
    """
    if levels == 0:
        return x
    _check_halvable(x, levels)
    f = 2 ** levels
    H, W = x.shape[-2:]
    x = x.reshape(*x.shape[:-2], H // f, f, W // f, f)  # [..., h, f, w, f]
    return x.mean(dim=(-3, -1))                        # [..., h, w]


def down_noise(n, levels=1):
    """Noise downsampling: the same pooling times 2 per level, so unit variance is kept and one
    full-resolution noise tensor yields the noise of every stage."""
    return down(n, levels) * 2 ** levels


def up(x, levels=1):
    """Up(x): nearest-neighbour upsampling by 2 per level on the last two dims."""
    f = 2 ** levels
    return x.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def _randn(shape, generator, like):
    """Standard normal noise drawn on the generator's device (CPU by default), then moved, so a
    laptop and a GPU give the same numbers for the same seed."""
    gen_device = generator.device if generator is not None else "cpu"
    z = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float64)
    return z.to(device=like.device, dtype=like.dtype)


# -----------------------------------------------------------------------------
# Training: coupled endpoints and the flow matching target (Sec. 3.2.1)

def endpoints(x1, noise_k, k, windows, noise_start=None, spatial=True):
    """(start, end) of stage k for clean data x1 (full resolution), Eqs. 9-10.

    noise_k is the noise n at stage k's resolution. Coupling (the paper's choice) uses the same n
    for both ends. Any pair of endpoints gives a straight segment; what coupling adds is that the
    target end - start becomes a function of x_t and x1 alone, so paths cross less and the learned
    flow is straighter ("to enhance the straightness of the flow trajectory", Sec. 3.2.1). Passing
    an independent `noise_start` gives the uncoupled ablation of App. C.4.
    """
    s, e = windows[k]
    lvl = (lambda j: j) if spatial else (lambda j: 0)
    n_start = noise_k if noise_start is None else noise_start
    end = e * down(x1, lvl(k)) + (1 - e) * noise_k                            # Eqs. 7, 9
    if k == len(windows) - 1:
        start = n_start  # s_{K-1} = 0: pure noise, and Down(x1, 2^K) is never needed  # Eq. 10
    else:
        # Eqs. 8, 10: the start, coupled to the end by the same noise
        start = s * up(down(x1, lvl(k + 1)), lvl(k + 1) - lvl(k)) + (1 - s) * n_start
    return start, end


def training_example(x1, k, windows, generator=None, coupled=True, spatial=True):
    """One flow matching sample of stage k for data x1 [B, ...]: returns (x_t, t, target).

    t ~ U[0, 1) is the local time of Eq. 6, one per sample; target = end - start (Eq. 11), the
    velocity d x_t / dt along the straight path between the stage's endpoints.
    """
    B = x1.shape[0]
    lvl = k if spatial else 0
    n_full = _randn(x1.shape, generator, x1)
    n_k = down_noise(n_full, lvl)  # Eq. 5: the noise of the whole flow, Down(x0), at stage k's size
    n_start = None if coupled else down_noise(_randn(x1.shape, generator, x1), lvl)
    start, end = endpoints(x1, n_k, k, windows, noise_start=n_start, spatial=spatial)
    t = torch.rand(B, generator=generator, dtype=torch.float64).to(x1.device, x1.dtype)
    tb = t.view(B, *[1] * (x1.dim() - 1))
    x_t = tb * end + (1 - tb) * start                                           # Eq. 6
    return x_t, t, end - start                                                  # Eq. 11


def velocity_from_clean(x1_hat, x_t, k, t, windows, min_gap=0.05, spatial=True):
    """The stage-k velocity implied by a prediction x1_hat of the clean frame at stage k's
    resolution (the end point without noise, Down(x1, 2^k)), for a network that predicts data
    rather than velocity ("x-prediction"; not the paper's parametrisation, an option here).

    On the coupled path (Eqs. 6, 9-10) x_t = t e x1 + (1 - t) s u + d n with u = Up(Down(x1)) and
    d = t (1 - e) + (1 - t)(1 - s), so x1_hat gives u_hat and the noise n_hat = (x_t - t e x1_hat
    - (1 - t) s u_hat) / d, and the velocity of Eq. 11 is end - start = e x1_hat - s u_hat + (s - e) n_hat.
    d -> 0 only at the very end of the last stage; it is clamped at `min_gap`. With
    `spatial=False` (no pixel grid) Up and Down are the identity, as in `endpoints`.
    """
    s, e = windows[k]
    t = t.view(-1, *[1] * (x_t.dim() - 1)).to(x_t.dtype)
    if s == 0:  # s_{K-1} = 0: no lower stage
        u = torch.zeros_like(x1_hat)
    else:
        u = up(down(x1_hat)) if spatial else x1_hat
    d = (t * (1 - e) + (1 - t) * (1 - s)).clamp(min=min_gap)
    n = (x_t - t * e * x1_hat - (1 - t) * s * u) / d
    return e * x1_hat - s * u + (s - e) * n


# -----------------------------------------------------------------------------
# Inference: corrective noise, renoising, and Algorithm 1 (Sec. 3.2.2, App. A)

def corrective_noise(shape, generator=None, like=None):
    """n' ~ N(0, Sigma'), Sigma' block-diagonal over 2x2 pixel blocks with 1 on the diagonal and
    -1/3 off it (Eqs. 14 and 22, gamma = -1/3).

    Closed form: with z ~ N(0, I), z - Up(AvgPool(z)) has 3/4 on the diagonal and -1/4 off it
    inside each block and zero across blocks; scaling by 2/sqrt(3) gives exactly Sigma'. Each
    block sums to zero, so the noise never moves the block means (the low-res signal).
    """
    like = like if like is not None else torch.empty(0)
    z = _randn(shape, generator, like)
    return 2 / math.sqrt(3) * (z - up(down(z)))                                 # Eq. 22


def renoise(x_end, s, generator=None, spatial=True, corrective=True):
    """Start of stage k from the end of stage k+1 (Eq. 15), with s = s_k:

        x_start = (1 + s)/2 * Up(x_end) + sqrt(3) (1 - s)/2 * n'

    (1 + s)/2 = s_k / e_{k+1} matches the means (Eq. 13); the corrective noise matches the
    covariance: the upsampled noise is fully correlated in each 2x2 block, n' decorrelates it.
    With `corrective=False` the noise term is dropped (the ablation of App. C.2, Fig. 10).
    Without a pixel grid (`spatial=False`) Up is the identity and n' is plain N(0, I).
    """
    # Eq. 12: mean e_{k+1} Up(Down(x1)), blocks of equal noise
    x_up = up(x_end) if spatial else x_end
    if not corrective:
        return (1 + s) / 2 * x_up
    n = corrective_noise(x_up.shape, generator, x_up) if spatial else _randn(x_up.shape, generator, x_up)
    return (1 + s) / 2 * x_up + math.sqrt(3) * (1 - s) / 2 * n                  # Eqs. 13, 15


_renoise = renoise  # sample() below has a flag of the same name


def stage_shape(shape, k, spatial=True):
    """The shape of a full-resolution `shape` at stage k."""
    if not spatial or k == 0:
        return tuple(shape)
    f = 2 ** k
    if shape[-2] % f or shape[-1] % f:
        raise ValueError(f"spatial size {shape[-2]}x{shape[-1]} cannot be halved {k} times "
                         f"(needs multiples of {f}); pick sizes divisible by 2^(K-1)")
    return (*shape[:-2], shape[-2] // f, shape[-1] // f)


@torch.no_grad()
def sample(velocity, shape, windows, steps, generator=None, renoise=True, spatial=True,
           dtype=torch.float32, device="cpu", callback=None):
    """Algorithm 1: generate a full-resolution sample of `shape`.

    velocity(x, k, t) -> dx/dt at local time t in [0, 1) of stage k (the caller maps (k, t) to
    its network's time input, e.g. with `model_time`). steps: an int, or one count per stage
    indexed by k. Euler steps are evenly spaced in each stage and every model call moves the
    sample (no wasted 0.001-long last step). `renoise=False` drops the corrective noise at jumps
    (App. C.2); a collection of stages keeps it at the jumps into those only (toy/renoise.py).
    K = 1 is standard flow matching, so baselines share this code.
    """
    K = len(windows)
    steps = [steps] * K if isinstance(steps, int) else list(steps)
    if len(steps) != K or min(steps) < 1:
        raise ValueError(f"steps must be a positive int or {K} positive ints, got {steps}")
    for k in range(K):
        stage_shape(shape, k, spatial)  # fail early on sizes the pyramid cannot halve
    like = torch.empty(0, dtype=dtype, device=device)
    x = _randn(stage_shape(shape, K - 1, spatial), generator, like)  # x_{s_{K-1}} ~ N(0, I)
    for k in range(K - 1, -1, -1):
        n = steps[k]
        for i in range(n):
            t = i / n
            x = x + velocity(x, k, t) / n        # Euler on Eq. 6: dx/dt = end - start (Eq. 11)
            if callback is not None:
                callback(x, k, (i + 1) / n)
        if k > 0:                                 # jump to the next stage (Eq. 15)
            corrective = renoise if isinstance(renoise, bool) else (k - 1) in renoise
            x = _renoise(x, windows[k - 1][0], generator, spatial, corrective=corrective)
    return x


# -----------------------------------------------------------------------------
# Temporal pyramid (Sec. 3.3)

def history_levels(num_history, k, K):
    """Pyramid level of each history frame, oldest first, when the current frame is at stage k:
    frame i-1 at level k, frame i-2 at level k+1, ..., capped at the lowest level K-1."""
    # d = i - frame index, oldest first
    return [min(k + d - 1, K - 1) for d in range(num_history, 0, -1)]


def history_condition(history, k, K, corrupt=False, generator=None, max_noise=1 / 3):
    """The history condition of Eqs. 16 (training) and 17 (sampling).

    history: clean latents of the frames before the current one, [B, C, T, H, W], oldest first
    (T may be 0). Returns the list of T frames [B, C, h, w] at their pyramid resolutions
    (`history_levels`). With `corrupt=True` (training) each sample's history is degraded as
    h = c eps + (1 - c) h with c ~ U[0, max_noise) per sample (1/3 in the release), eps
    unit-variance noise drawn at each frame's own resolution, against error accumulation in
    autoregressive sampling.
    """
    B, T = history.shape[0], history.shape[2]
    if T == 0:
        return []
    if corrupt:
        c = torch.rand(B, generator=generator, dtype=torch.float64).to(history.device, history.dtype) * max_noise
        c = c.view(B, 1, 1, 1)
    frames = []
    # j = 0 is the oldest frame, j = T-1 frame i-1
    for j, level in enumerate(history_levels(T, k, K)):
        h = down(history[:, :, j], level)  # Eqs. 16-17: frame i-d at level min(k+d-1, K-1), d = T-j
        if corrupt:
            h = c * _randn(h.shape, generator, h) + (1 - c) * h   # Eq. 16: the corrupted frame i-d
        frames.append(h)
    return frames


@torch.no_grad()
def sample_video(velocity, frame_shape, num_frames, windows, steps, steps_later=None, prefix=None,
                 generator=None, renoise=True, dtype=torch.float32, device="cpu", on_frame=None,
                 condition=None, max_history=0):
    """Autoregressive generation: Algorithm 1 for each latent frame, conditioned on the clean
    temporal pyramid of the frames before it (Eq. 17).

    velocity(history, x, k, t): history is the list of clean history frames at their pyramid
    resolutions for stage k (`history_condition`), x the current frame at stage k. frame_shape is
    one full-resolution frame [B, C, H, W]. `prefix` [B, C, P, H, W] holds given clean frames (an
    image for image-to-video, a clip to continue): they are kept and only the rest is generated.
    The first frame takes `steps`, later frames `steps_later` (default: the same). Returns the
    video [B, C, num_frames, H, W].
    condition(history, x, k), optional: called once per frame and stage with that history and the
    stage's first x; what it returns reaches velocity in place of the history (work shared by the
    steps of a stage, e.g. a KV cache of the history tokens). max_history > 0 keeps only that many
    most recent frames as history, the oldest dropped (0 = all): memory and time for long videos.
    """
    if max_history < 0:
        raise ValueError(f"max_history must be >= 0 (0 = all frames), got {max_history}")
    K = len(windows)
    frames = [] if prefix is None else list(prefix.to(device, dtype).unbind(2))
    for i in range(len(frames), num_frames):
        kept = frames[-max_history:] if max_history else frames
        past = torch.stack(kept, 2) if kept else None  # [B, C, len(kept), H, W]
        conds = {}

        def v(x, k, t):
            if k not in conds:  # the history pyramid depends on the stage, not on t
                history = history_condition(past, k, K) if past is not None else []  # Eq. 17
                conds[k] = history if condition is None else condition(history, x, k)
            return velocity(conds[k], x, k, t)
        n = steps if i == 0 or steps_later is None else steps_later
        frames.append(sample(v, frame_shape, windows, n, generator, renoise, dtype=dtype, device=device))
        if on_frame is not None:
            on_frame(i)
    return torch.stack(frames, 2)


def pyramid_tokens(h, w, num_frames, k, K, patch=1):
    """Tokens the DiT sees for the LAST of `num_frames` latent frames [h, w] at stage k: the
    current frame at level k plus the temporal pyramid of its history (Eq. 16).

    The paper's 15,360 for 31 latent frames of 768p (Sec. 4.2) is this count at k = 0:
    3840 + 3840 + 960 + 28 * 240. Its formula "TN/4^K" is one level off: the oldest frames sit
    at level K-1 (N/4^(K-1) tokens each), not K; with 4^K the count would be 3840 + 3840 + 960 +
    28 * 60."""
    def tokens(level):
        return (h // 2 ** level // patch) * (w // 2 ** level // patch)
    return tokens(k) + sum(tokens(lv) for lv in history_levels(num_frames - 1, k, K))


def full_sequence_tokens(h, w, num_frames, patch=1):
    """Tokens of the full-sequence baseline: every frame at full resolution."""
    return num_frames * (h // patch) * (w // patch)
