"""Decoding a video or an image into a training clip as a player shows it (App. B's data, read by
video_data.py's extraction): the display rotation applied, frames picked by timestamp at a target
frame rate (variable frame rates included), bit depth and alpha converted as sample.py converts
them (common.to_rgb), each frame resized to cover the clip's size and centre-cropped.

Tensor legend: one clip [3, F, H, W], pixels in [-1, 1], F pixel frames.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from common import first_line, to_rgb


class BadClip(Exception):
    """A missing, unreadable or too-short file; the message is one line saying which and why."""



def media_path(entry):
    return entry.get("video") or entry.get("image")


# ----------------------------------------------------------------------------- pixels
def clip_length(available: int, frames: int, temporal_factor: int) -> int:
    """Frames kept of a video with `available` frames: the longest 1 + f*k <= min(available, frames)."""
    return 1 + (min(available, frames) - 1) // temporal_factor * temporal_factor


def read_clip(entry, height, width, frames, temporal_factor, min_frames=None, fps=None):
    """An entry -> pixels [3, F, H, W] in [-1, 1]: each frame as a player shows it (rotation
    applied, alpha composited on black and 16-bit scaled to 8 as sample.py reads images:
    common.to_rgb), resized to cover H x W and centre-cropped, the first 1 + f*k <= `frames`
    frames kept (a shorter video gives a shorter clip; clips of equal length are batched
    together). An image is a one-frame clip, and so is a video when frames = 1 (an image phase:
    its first frame). fps: resample to this frame rate first by the frames' timestamps (the frame
    on screen at each time j / fps, as ffmpeg's fps filter picks it; variable frame rates
    included), so that `frames` is a duration whatever the file's rate (the paper: 24 fps, 121
    frames = 5 s); None keeps every stored frame. A video shorter than `min_frames` (default
    1 + f: one latent frame after the image latent) is too short; min_frames=frames keeps only
    full-length clips, as the release's fixed-duration clips. Raises BadClip for a missing,
    unreadable or too-short file."""
    if (frames - 1) % temporal_factor:
        raise ValueError(f"frames={frames} is not 1 + {temporal_factor}*k")
    path = media_path(entry)
    if not path or not os.path.isfile(path):
        raise BadClip(f"missing file {path}")
    crop = lambda frame: _cover_crop(frame, height, width)  # noqa: E731
    try:
        if "image" in entry:
            from PIL import Image
            with Image.open(path) as im:
                pixels = [crop(np.asarray(to_rgb(im)))]
        else:
            pixels = _decode(path, frames, crop, fps)
    except Exception as e:  # decoders raise many kinds; any of them means this file is unreadable
        raise BadClip(f"unreadable {path}: {first_line(e)}") from None
    shortest = 1 if "image" in entry or frames == 1 else (min_frames or 1 + temporal_factor)
    if len(pixels) < shortest:
        raise BadClip(f"too short {path}: {len(pixels)} frames, needs at least {shortest}")
    pixels = pixels[:clip_length(len(pixels), frames, temporal_factor)]
    return torch.stack(pixels, dim=1)                                          # [3, F, H, W]


def _decode(path, limit, transform, fps=None):
    """transform(frame) of the first `limit` frames of a video (uint8 [H, W, 3] each, as a player
    shows it), resampled to `fps` by timestamp if given, decoding no further. A gif: Pillow (its
    frame durations, its transparency as to_rgb treats it). Else PyAV when installed: the decoder
    of imageio's pyav plugin, called directly, as the plugin runs gc.collect() whenever it closes
    a file (0.1-0.9 s per file in a process that holds torch, measured: days over a million
    clips), with the stream's display rotation applied. Else the ffmpeg binary of imageio-ffmpeg,
    which rotates and resamples (its fps filter) itself."""
    if path.lower().endswith(".gif"):
        from PIL import Image, ImageSequence
        with Image.open(path) as im:
            # a frame's time: the durations before it (ms; Pillow's default 100)
            starts = np.cumsum([0] + [f.info.get("duration", 100) / 1000 for f in ImageSequence.Iterator(im)])
            return _take(((t, np.asarray(to_rgb(f))) for t, f in zip(starts, ImageSequence.Iterator(im))),
                         limit, transform, fps)
    try:
        import av
    except ImportError:
        import imageio_ffmpeg
        resample = ["-vf", f"fps={fps}:round=near:eof_action=pass"] if fps else None  # as _take picks
        gen = imageio_ffmpeg.read_frames(path, output_params=resample)
        try:
            meta = next(gen)
            w, h = meta["size"]
            frames = ((None, np.frombuffer(b, np.uint8).reshape(h, w, 3)) for b in gen)
            return _take(frames, limit, transform, None)
        finally:
            gen.close()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"                     # frame and slice threads: HD decodes faster
        # a file without timestamps: frame n at n / its rate
        rate = float(stream.average_rate or stream.guessed_rate or 1)

        def frames():
            for n, f in enumerate(container.decode(stream)):
                # counter-clockwise degrees of the display matrix (a phone's portrait video)
                turns = round(getattr(f, "rotation", 0) or 0) // 90 % 4
                yield (f.time if f.time is not None else n / rate), np.rot90(f.to_ndarray(format="rgb24"), turns)
        return _take(frames(), limit, transform, fps)


def _take(frames, limit, transform, fps):
    """transform() of `limit` frames from (time in s, frame) pairs: every frame if fps is None, else
    the one on screen at each target slot n: the last frame that starts before (n + 1/2) / fps
    after the first (ffmpeg's fps filter, round=near), a frame repeating or dropped as the rates
    differ; slots end at the last frame."""
    out, n, current, t0 = [], 0, None, None
    for t, frame in frames:
        if fps is None:
            out.append(transform(frame))
            if len(out) == limit:
                return out
            continue
        t0 = t if t0 is None else t0
        # 1e-6: a slot edge may land just off a timestamp
        while current is not None and (t - t0) * fps >= n + 0.5 - 1e-6:
            out.append(transform(current))
            n += 1
            if len(out) == limit:
                return out
        current, last = frame, t
    if current is not None:  # the last frame, in its own slot
        while len(out) < limit and n <= (last - t0) * fps + 0.5 - 1e-6:
            out.append(transform(current))
            n += 1
    return out


def _cover_crop(frame, height, width):
    """uint8 [h0, w0, 3] -> float [3, H, W] in [-1, 1]: resized to cover H x W, centre-cropped."""
    frame = np.array(frame[..., :3])  # a copy: decoders may hand out read-only (or rotated) arrays
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()                # [1, 3, h0, w0]
    h0, w0 = x.shape[-2:]
    scale = max(height / h0, width / w0)
    size = (max(height, round(h0 * scale)), max(width, round(w0 * scale)))
    if size != (h0, w0):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return (x[0, :, top:top + height, left:left + width] / 127.5 - 1).clamp(-1, 1)  # [3, H, W]
