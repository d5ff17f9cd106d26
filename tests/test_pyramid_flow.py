"""Tests of the method core, pyramid_flow.py: exact identities in float64, statistics with fixed
seeds and tolerances from the sample size (a sample covariance of N draws has a standard error of
at most sqrt(2/N) for unit-variance entries; we allow 5 standard errors)."""
import math

import pytest
import torch
import torch.nn.functional as F

import pyramid_flow as pf



@pytest.fixture(autouse=True)
def float64():
    """Exact identities are checked in float64; restored afterwards for the other test files."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- windows and time

def test_windows_K3_are_the_papers():
    w = pf.stage_windows(3)
    expect = [(0.5, 1.0), (0.2, 2 / 3), (0.0, 1 / 3)]
    for (s, e), (s0, e0) in zip(w, expect):
        assert s == pytest.approx(s0, abs=1e-12) and e == pytest.approx(e0, abs=1e-12)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_jump_rule_and_uniform_ends(K):
    w = pf.stage_windows(K)
    assert len(w) == K and w[0][1] == 1.0 and w[K - 1][0] == 0.0
    for k in range(K):
        assert w[k][1] == pytest.approx((K - k) / K)        # uniform split of the ends
        assert w[k][0] < w[k][1]
    for k in range(K - 1):
        s_k, e_next = w[k][0], w[k + 1][1]
        assert e_next == pytest.approx(2 * s_k / (1 + s_k))  # e_{k+1} = 2 s_k / (1 + s_k)


def test_bad_K():
    for K in (0, -1, 2.5):
        with pytest.raises(ValueError, match="K must be"):
            pf.stage_windows(K)


def test_model_time_is_monotone_and_stage_aware():
    w = pf.stage_windows(3)
    traj = [pf.model_time(k, i / 10, w) for k in (2, 1, 0) for i in range(10)] + [pf.model_time(0, 1, w)]
    assert all(a < b for a, b in zip(traj, traj[1:]))
    assert traj[0] == 0 and traj[-1] == pytest.approx(1)
    # the release's boundaries 1000 -> 744 -> 386 -> 0, read on its reversed clock
    assert 1 - pf.model_time(1, 0, w) == pytest.approx(0.744, abs=2e-3)  # grid rounding
    assert 1 - pf.model_time(0, 0, w) == pytest.approx(0.386, abs=2e-3)
    # same t in overlapping windows maps to different model times
    assert pf.model_time(1, 0.9, w) != pf.model_time(0, 0.0, w)


# ---------------------------------------------------------------- resampling

def test_down_is_bilinear_halving_and_up_is_nearest():
    x = torch.randn(2, 3, 5, 8, 12, generator=gen())  # a video [B, C, T, H, W]
    flat = x.reshape(-1, 1, 8, 12)
    bil = F.interpolate(flat, scale_factor=0.5, mode="bilinear", align_corners=False).reshape(2, 3, 5, 4, 6)
    assert torch.allclose(pf.down(x), bil, atol=1e-12)
    assert torch.allclose(pf.down(x, 2), pf.down(pf.down(x)), atol=1e-12)
    assert torch.equal(pf.up(x)[..., ::2, ::2], x) and torch.equal(pf.up(x)[..., 1::2, 1::2], x)
    assert torch.allclose(pf.down(pf.up(x, 2), 2), x)


def test_down_noise_keeps_unit_variance():
    N = 200_000
    n = torch.randn(N // 64, 1, 32, 32, generator=gen(1))
    for lv in (1, 2, 3):
        v = pf.down_noise(n, lv).var().item()
        m = n.numel() // 4 ** lv
        assert abs(v - 1) < 5 * math.sqrt(2 / m)


def test_down_refuses_sizes_it_cannot_halve():
    with pytest.raises(ValueError, match="cannot be halved 2 times"):
        pf.down(torch.zeros(1, 3, 6, 8), 2)
    with pytest.raises(ValueError, match="cannot be halved"):
        pf.sample(lambda x, k, t: x, (1, 3, 12, 12), pf.stage_windows(4), 1)


# ---------------------------------------------------------------- corrective noise and renoising

def block_cov(x):
    """Empirical covariance of the 16 pixels of the top-left 4x4 patch (four 2x2 blocks)."""
    v = x[:, 0, :4, :4].reshape(x.shape[0], 16)
    v = v - v.mean(0)
    return v.T @ v / (v.shape[0] - 1)


def block_structure(c_diag, c_in, c_out):
    """16x16 covariance with c_diag on the diagonal, c_in inside a 2x2 block, c_out across."""
    idx = torch.arange(16)
    r, c = idx // 4, idx % 4
    block = (r // 2) * 2 + c // 2
    same = block[:, None] == block[None, :]
    cov = torch.where(same, torch.tensor(c_in), torch.tensor(c_out))
    cov.fill_diagonal_(c_diag)
    return cov


def test_corrective_noise_covariance():
    N = 40_000
    n = pf.corrective_noise((N, 1, 4, 4), generator=gen(2))
    tol = 5 * math.sqrt(2 / N)
    assert (block_cov(n) - block_structure(1.0, -1 / 3, 0.0)).abs().max() < tol
    assert pf.down(n).abs().max() < 1e-12  # every 2x2 block has zero mean, exactly
    # seedable: same generator seed, same noise
    assert torch.equal(pf.corrective_noise((2, 3, 4, 4), gen(5)), pf.corrective_noise((2, 3, 4, 4), gen(5)))


def test_renoise_reproduces_the_start_law_of_the_next_stage():
    """Exact end of stage k+1 -> renoise -> the start law of stage k (Eq. 10): mean and covariance.
    Dropping the corrective noise fails the same check."""
    N, K, k = 40_000, 3, 1
    w = pf.stage_windows(K)
    x1 = torch.randn(1, 1, 8, 8, generator=gen(3)).expand(N, 1, 8, 8)     # one data point
    n = torch.randn(N, 1, 2, 2, generator=gen(4))                          # noise of stage k+1
    _, end_next = pf.endpoints(x1, n, k + 1, w)
    s = w[k][0]
    mean_expected = s * pf.up(pf.down(x1, k + 1), 1)[0]                  # Eq. 10's mean
    tol = 5 * math.sqrt(2 / N)
    for corrective, should_pass in ((True, True), (False, False)):
        start = pf.renoise(end_next, s, gen(6), corrective=corrective)
        mean_ok = (start.mean(0) - mean_expected).abs().max() < 5 / math.sqrt(N)
        cov = block_cov(start) / (1 - s) ** 2                             # should be I
        cov_ok = (cov - torch.eye(16)).abs().max() < tol
        assert mean_ok                                                    # the rescale fixes the mean
        assert cov_ok == should_pass


def test_renoise_keeps_the_low_frequencies_of_the_previous_stage():
    x_end = torch.randn(4, 3, 4, 4, generator=gen(7))
    s = 0.2
    start = pf.renoise(x_end, s, gen(8))
    # the corrective noise is zero-mean in every block: block means are the rescaled previous end
    assert torch.allclose(pf.down(start), (1 + s) / 2 * x_end, atol=1e-12)


# ---------------------------------------------------------------- training examples

def test_coupled_endpoints_share_one_noise_direction():
    w = pf.stage_windows(3)
    x1 = torch.randn(3, 2, 16, 16, generator=gen(9))
    for k in range(3):
        n = torch.randn(3, 2, 16 // 2 ** k, 16 // 2 ** k, generator=gen(10 + k))
        start, end = pf.endpoints(x1, n, k, w)
        s, e = w[k]
        assert torch.allclose(end - e * pf.down(x1, k), (1 - e) * n)                           # Eq. 9
        low = pf.up(pf.down(x1, k + 1), 1) if k < 2 else 0
        assert torch.allclose(start - s * low, (1 - s) * n)                                    # Eq. 10
    start, end = pf.endpoints(x1, torch.randn(3, 2, 16, 16, generator=gen(13)), 0, w)
    assert torch.allclose(end, x1)  # e_0 = 1: the last stage ends on the data


def test_training_example_line_and_target():
    w = pf.stage_windows(3)
    x1 = torch.randn(64, 2, 8, 8, generator=gen(11))
    for coupled in (True, False):
        x_t, t, target = pf.training_example(x1, 1, w, gen(12), coupled=coupled)
        assert x_t.shape == (64, 2, 4, 4) and t.shape == (64,) and target.shape == x_t.shape
        assert ((t >= 0) & (t < 1)).all()
    # coupled: x_t - mean is (1 - s - t(e - s)) n, so a straight path; recover n and check it is N(0, 1)
    x1 = torch.zeros(20_000, 1, 4, 4)
    x_t, t, target = pf.training_example(x1, 0, w, gen(14), coupled=True)
    s, e = w[0]
    n = x_t / (1 - s - t.view(-1, 1, 1, 1) * (e - s))
    assert abs(n.var().item() - 1) < 5 * math.sqrt(2 / n.numel())
    assert torch.allclose(target, (s - e) * n)


def test_velocity_from_clean_is_the_target_for_the_true_clean_frame():
    """x-prediction: the clean stage-k frame Down(x1, 2^k) turns into exactly the target of Eq. 11."""
    w = pf.stage_windows(3)
    x1 = torch.randn(16, 3, 16, 16, generator=gen(40))
    for k in range(3):
        x_t, t, target = pf.training_example(x1, k, w, gen(41 + k))
        v = pf.velocity_from_clean(pf.down(x1, k), x_t, k, t, w, min_gap=1e-12)
        assert torch.allclose(v, target, atol=1e-9)
    # K = 1 is plain flow matching: v = (x1_hat - x_t) / (1 - t)
    w1 = pf.stage_windows(1)
    x_t, t, _ = pf.training_example(x1, 0, w1, gen(45))
    guess = torch.randn(x1.shape, generator=gen(46))
    v = pf.velocity_from_clean(guess, x_t, 0, t, w1, min_gap=1e-12)
    assert torch.allclose(v, (guess - x_t) / (1 - t.view(-1, 1, 1, 1)))
    # the clamp bounds the division near the end of the last stage
    v = pf.velocity_from_clean(guess, x_t, 0, torch.ones(16), w1, min_gap=0.05)  # d = 0 unclamped
    assert torch.allclose(v, guess - (x_t - guess) / 0.05)
    # without a pixel grid (the 2-D toy) Up and Down are the identity on both sides
    p1 = torch.randn(64, 2, generator=gen(47))
    for k in range(3):
        x_t, t, target = pf.training_example(p1, k, w, gen(48 + k), spatial=False)
        assert torch.allclose(pf.velocity_from_clean(p1, x_t, k, t, w, min_gap=1e-12, spatial=False), target,
                              atol=1e-9)


# ---------------------------------------------------------------- the sampler

def one_point_velocity(c, windows, spatial=True):
    """The exact velocity field of a data set holding the single point c (full resolution)."""
    K = len(windows)

    def v(x, k, t):
        s, e = windows[k]
        lv = (lambda j: j) if spatial else (lambda j: 0)
        end_mean = e * pf.down(c, lv(k))
        start_mean = s * pf.up(pf.down(c, lv(k + 1)), lv(k + 1) - lv(k)) if k < K - 1 else 0 * end_mean
        A = t * end_mean + (1 - t) * start_mean
        B = t * (1 - e) + (1 - t) * (1 - s)
        n = (x - A) / B
        return end_mean - start_mean + (s - e) * n
    return v


@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("spatial", [True, False])
def test_sampler_lands_on_a_one_point_data_set(K, spatial):
    w = pf.stage_windows(K)
    c = torch.randn(1, 3, 16, 16, generator=gen(15)).expand(5, 3, 16, 16)
    x = pf.sample(one_point_velocity(c, w, spatial), c.shape, w, steps=[3, 4, 5, 2][:K],
                  generator=gen(16), spatial=spatial, dtype=torch.float64)
    assert torch.allclose(x, c, atol=1e-9)


@pytest.mark.parametrize("K", [1, 3])
def test_sampler_with_a_clean_frame_predictor_lands_on_it(K):
    """A network that always predicts the clean frame c (x-prediction) drives the sampler to c."""
    w = pf.stage_windows(K)
    c = torch.randn(1, 3, 16, 16, generator=gen(47)).expand(4, 3, 16, 16)
    v = lambda x, k, t: pf.velocity_from_clean(pf.down(c, k), x, k, torch.full((4,), t), w)
    x = pf.sample(v, c.shape, w, steps=[3, 4, 5][:K], generator=gen(48), dtype=torch.float64)
    assert torch.allclose(x, c, atol=1e-9)


def test_sampler_is_seeded_and_calls_each_stage_at_its_resolution():
    w = pf.stage_windows(3)
    calls = []

    def v(x, k, t):
        calls.append((k, tuple(x.shape[-2:]), t))
        return torch.zeros_like(x)
    a = pf.sample(v, (2, 1, 8, 8), w, steps=[2, 3, 4], generator=gen(17))
    b = pf.sample(v, (2, 1, 8, 8), w, steps=[2, 3, 4], generator=gen(17))
    assert torch.equal(a, b)
    assert [c[:2] for c in calls[:9]] == [(2, (2, 2))] * 4 + [(1, (4, 4))] * 3 + [(0, (8, 8))] * 2
    assert [c[2] for c in calls[:4]] == [0, 0.25, 0.5, 0.75]  # evenly spaced, no wasted step
    with pytest.raises(ValueError, match="steps"):
        pf.sample(v, (2, 1, 8, 8), w, steps=[2, 3])


# ---------------------------------------------------------------- temporal pyramid

@pytest.mark.parametrize("K,k,T,expect", [
    (3, 0, 0, []), (3, 0, 1, [0]), (3, 0, 2, [1, 0]), (3, 0, 4, [2, 2, 1, 0]),
    (3, 1, 3, [2, 2, 1]), (3, 2, 3, [2, 2, 2]), (1, 0, 3, [0, 0, 0]), (4, 1, 4, [3, 3, 2, 1]),
])
def test_history_resolutions(K, k, T, expect):
    assert pf.history_levels(T, k, K) == expect
    h = torch.randn(2, 4, T, 16, 16, generator=gen(18))
    frames = pf.history_condition(h, k, K)
    assert [f.shape for f in frames] == [(2, 4, 16 // 2 ** lv, 16 // 2 ** lv) for lv in expect]
    for j, (f, lv) in enumerate(zip(frames, expect)):
        assert torch.allclose(f, pf.down(h[:, :, j], lv))  # clean at sampling (Eq. 17)


def test_history_corruption_is_small_and_per_sample():
    N = 4000
    h = torch.zeros(N, 1, 2, 8, 8)
    frames = pf.history_condition(h, 0, 3, corrupt=True, generator=gen(19))
    # h = c eps + (1 - c) h with c ~ U[0, 1/3): on zero history, E[x^2] = E[c^2] = 1/27
    m2 = torch.stack([f.pow(2).mean((1, 2, 3)) for f in frames]).mean().item()
    assert abs(m2 - 1 / 27) < 5 * math.sqrt(1 / 405 / N)  # Var(c^2) = 1/405 - 1/729 < 1/405
    # one c per sample, shared by its frames: the per-sample rms estimates c from m = 80 values,
    # with a relative standard error of about 1/sqrt(2m)
    m = 16 + 64
    rms = torch.cat([f.flatten(1) for f in frames], 1).pow(2).mean(1).sqrt()
    assert rms.max() < (1 / 3) * (1 + 5 / math.sqrt(2 * m)) and rms.min() < 0.05
    # max_noise bounds c: 0.1 here (rms up to 0.1), 0 leaves the history clean
    small = pf.history_condition(h, 0, 3, corrupt=True, generator=gen(19), max_noise=0.1)
    rms = torch.cat([f.flatten(1) for f in small], 1).pow(2).mean(1).sqrt()
    assert 0.09 < rms.max() < 0.1 * (1 + 5 / math.sqrt(2 * m))
    clean = pf.history_condition(h + 1, 0, 3, corrupt=True, generator=gen(19), max_noise=0.0)
    assert all(torch.equal(f, torch.ones_like(f)) for f in clean)


def test_paper_token_counts():
    # 768p -> latent 96x160 (8x VAE), 31 latent frames, patch 2, K = 3, full-resolution stage
    assert pf.pyramid_tokens(96, 160, 31, 0, 3, patch=2) == 3840 + 3840 + 960 + 28 * 240 == 15_360
    assert pf.full_sequence_tokens(96, 160, 31, patch=2) == 31 * 3840 == 119_040


def test_sample_video_keeps_the_prefix_and_feeds_the_history_pyramid():
    w = pf.stage_windows(3)
    calls = []

    def v(history, x, k, t):
        calls.append((len(history), k, [tuple(h.shape[-2:]) for h in history], tuple(x.shape[-2:])))
        return torch.zeros_like(x)
    prefix = torch.randn(2, 1, 1, 8, 8, generator=gen(20))
    video = pf.sample_video(v, (2, 1, 8, 8), 3, w, steps=[1, 2, 3], steps_later=1, prefix=prefix,
                            generator=gen(21), dtype=torch.float64)
    assert video.shape == (2, 1, 3, 8, 8) and torch.equal(video[:, :, 0], prefix[:, :, 0])
    # frame 1: one history frame, at each stage's own resolution; later frames take steps_later
    assert [c for c in calls if c[0] == 1] == [(1, 2, [(2, 2)], (2, 2)), (1, 1, [(4, 4)], (4, 4)),
                                               (1, 0, [(8, 8)], (8, 8))]
    # frame 2 at stage 0: frame 1 at full resolution, frame 0 one level lower (Eq. 17)
    assert (2, 0, [(4, 4), (8, 8)], (8, 8)) in calls
    # without a prefix the first frame uses `steps` (1 + 2 + 3 calls)
    calls.clear()
    pf.sample_video(v, (2, 1, 8, 8), 1, w, steps=[1, 2, 3], generator=gen(22))
    assert len(calls) == 6
