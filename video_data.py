"""Real data for the paper's recipe: captioned videos and images and their pre-extracted features.

App. B of Jin et al., "Pyramidal Flow Matching for Efficient Video Generative Modeling" (ICLR
2025) trains on captioned videos (and images: one-frame clips) whose VAE latents and T5/CLIP text
features are extracted once beforehand, as the authors' release does, so that training runs the
DiT only. This file reads and writes the release's format:

- annotation file, JSON lines: {"video": path, "text": caption} or {"image": path, "text": ...},
  optionally with "latent" and "text_fea", the paths of the extracted tensors. Relative paths
  resolve against the annotation file's folder. Or a folder of videos and images, each with a
  same-named .txt caption.
- latent file: torch.save of the clip's normalised VAE latents [1, C, T, h, w] (an image: T = 1).
- text feature file: torch.save of dict(prompt_embed [1, L, D], prompt_attention_mask [1, L],
  pooled_prompt_embed [1, P]).

read_clip turns one entry into pixels (decoded by PyAV, or imageio-ffmpeg); extract (train.py
--task=extract) writes the features, sharded over ranks and resumable, and an annotation file
pointing at them (with one key of ours, "latent_frames", so that loading it reads no tensor);
FeatureDataset serves batches of them, bucketed by latent length. Every tensor file is read with
torch.load(weights_only=True) (or safetensors): a file from elsewhere can hold tensors, never code.

Tensor legend: one clip [3, F, H, W] (pixels in [-1, 1], F pixel frames); latents [B, C, T, h, w];
tokens [B, L, D].
"""
import hashlib
import json
import os
import pickle
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import first_line, load_vae, save_text, save_torch, setup_distributed

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# resolved against the annotation file's folder
PATH_KEYS = ("video", "image", "latent", "text_fea")
MAX_BAD_FRACTION = 0.5   # more bad entries than this: the data, not a few files, is broken; stop
# extracted tensors on disk: half of float32, the precision bf16 training uses
STORE_DTYPE = torch.bfloat16
TEXT_BATCH = 32          # captions per text-encoder call during extraction
NULL_TEXT = "null_text.pt"   # features of "" (the null caption of CFG and caption dropout)
SHARD = "extracted.rank{}.jsonl"
EXTRACTED = "extracted.jsonl"


class BadClip(Exception):
    """A missing, unreadable or too-short file; the message is one line saying which and why."""


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- annotations
def load_entries(path: str) -> list[dict]:
    """A .jsonl annotation file or a folder of media with .txt captions -> entries with absolute paths."""
    if os.path.isdir(path):
        return _folder_entries(path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: no annotation file or folder at {path}")
    root = os.path.dirname(os.path.abspath(path))
    entries = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{n}: not a JSON object ({e.msg})") from None
            if (not isinstance(entry, dict) or not ({"text", "text_fea"} & entry.keys())
                    or not ({"video", "image", "latent"} & entry.keys())):
                raise SystemExit(f'error: {path}:{n}: expected {{"video" or "image": path, "text": caption}}')
            for key in PATH_KEYS & entry.keys():
                # an absolute path stays
                entry[key] = os.path.normpath(os.path.join(root, entry[key]))
            entries.append(entry)
    if not entries:
        raise SystemExit(f"error: {path} has no entries")
    return entries


def _folder_entries(folder):
    """Every video and image under `folder` (sorted) whose same-named .txt caption exists."""
    entries, uncaptioned = [], 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in VIDEO_EXTS + IMAGE_EXTS:
                continue
            caption = os.path.join(root, stem + ".txt")
            if not os.path.isfile(caption):
                uncaptioned += 1
                continue
            with open(caption) as f:
                text = f.read().strip()
            kind = "video" if ext.lower() in VIDEO_EXTS else "image"
            entries.append({kind: os.path.abspath(os.path.join(root, name)), "text": text})
    if uncaptioned:
        warn(f"{uncaptioned} videos/images in {folder} have no same-named .txt caption; skipped")
    if not entries:
        raise SystemExit(f"error: no captioned videos or images in {folder} (each needs NAME.txt beside it)")
    return entries


def media_path(entry):
    return entry.get("video") or entry.get("image")


# ----------------------------------------------------------------------------- pixels
def clip_length(available: int, frames: int, temporal_factor: int) -> int:
    """Frames kept of a video with `available` frames: the longest 1 + f*k <= min(available, frames)."""
    return 1 + (min(available, frames) - 1) // temporal_factor * temporal_factor


def read_clip(entry, height, width, frames, temporal_factor, min_frames=None, fps=None):
    """An entry -> pixels [3, F, H, W] in [-1, 1]: each frame resized to cover H x W and
    centre-cropped, the first 1 + f*k <= `frames` frames kept (a shorter video gives a shorter
    clip; clips of equal length are batched together). An image is a one-frame clip.
    fps: resample to this frame rate first (the frame on screen at each time j / fps), so that
    `frames` is a duration whatever the file's rate (the paper: 24 fps, 121 frames = 5 s);
    None keeps every stored frame. A video shorter than `min_frames` (default 1 + f: one latent
    frame after the image latent) is too short; min_frames=frames keeps only full-length clips,
    as the release's fixed-duration clips. Raises BadClip for a missing, unreadable or too-short file."""
    if (frames - 1) % temporal_factor:
        raise ValueError(f"frames={frames} is not 1 + {temporal_factor}*k")
    path = media_path(entry)
    if not path or not os.path.isfile(path):
        raise BadClip(f"missing file {path}")
    try:
        if "image" in entry:
            from PIL import Image
            with Image.open(path) as im:
                pixels = [_cover_crop(np.asarray(im.convert("RGB")), height, width)]
        else:
            pixels = _decode(path, frames, lambda frame: _cover_crop(frame, height, width), fps)
    except Exception as e:  # decoders raise many kinds; any of them means this file is unreadable
        raise BadClip(f"unreadable {path}: {first_line(e)}") from None
    shortest = 1 if "image" in entry else (min_frames or 1 + temporal_factor)
    if len(pixels) < shortest:
        raise BadClip(f"too short {path}: {len(pixels)} frames, needs at least {shortest}")
    pixels = pixels[:clip_length(len(pixels), frames, temporal_factor)]
    return torch.stack(pixels, dim=1)                                          # [3, F, H, W]


def _decode(path, limit, transform, fps=None):
    """transform(frame) of the first `limit` frames of a video (uint8 [H, W, 3] each), resampled
    to `fps` if given, decoding no further. PyAV when installed: the decoder of imageio's pyav
    plugin, called directly, as the plugin runs gc.collect() whenever it closes a file (0.1-0.9 s
    per file in a process that holds torch, measured: days over a million clips). Else imageio's
    ffmpeg plugin."""
    try:
        import av
    except ImportError:
        import imageio.v3 as iio
        step = iio.immeta(path, plugin="FFMPEG").get("fps", fps) / fps if fps else 1.0
        frames = iio.imiter(path, plugin="FFMPEG")
        try:
            return _take(frames, limit, transform, step)
        finally:
            frames.close()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"                     # frame and slice threads: HD decodes faster
        # None when the file does not say: no resampling
        rate = stream.average_rate or stream.guessed_rate
        step = float(rate) / fps if fps and rate else 1.0
        return _take(container.decode(stream), limit, lambda f: transform(f.to_ndarray(format="rgb24")), step)


def _take(frames, limit, transform, step):
    """transform() of the frames shown at target times j (in target frames): source frame
    floor(j * step), step = source fps / target fps (a frame repeats when step < 1), `limit` of them."""
    out, j = [], 0
    for n, frame in enumerate(frames):
        # 1e-6: j * step may land just below a whole number
        while int(j * step + 1e-6) == n:
            out.append(transform(frame))
            j += 1
            if len(out) == limit:
                return out
    return out


def _cover_crop(frame, height, width):
    """uint8 [h0, w0, 3] -> float [3, H, W] in [-1, 1]: resized to cover H x W, centre-cropped."""
    frame = np.array(frame[..., :3])  # a copy: decoders may hand out read-only arrays
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()                # [1, 3, h0, w0]
    h0, w0 = x.shape[-2:]
    scale = max(height / h0, width / w0)
    size = (max(height, round(h0 * scale)), max(width, round(w0 * scale)))
    if size != (h0, w0):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return (x[0, :, top:top + height, left:left + width] / 127.5 - 1).clamp(-1, 1)  # [3, H, W]


# ----------------------------------------------------------------------------- tensor files
def load_tensors(path, mmap=False):
    """torch.load(weights_only=True) or safetensors, refusing with one line a file that would
    need to run code to load (an untrusted pickle). mmap: read tensor data only when touched."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise SystemExit(f"error: refused {path}: not a plain tensor file (loading it would run code "
                         "from it); torch.load(weights_only=True) reads tensors only") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file at all
        raise SystemExit(f"error: cannot read {path}: {first_line(e)}") from None


def _latent(obj, path):
    """A latent file's content -> [C, T, h, w] (a safetensors file holds one tensor)."""
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not torch.is_tensor(obj) or obj.ndim not in (4, 5) or (obj.ndim == 5 and obj.shape[0] != 1):
        raise SystemExit(f"error: {path}: expected a latent tensor [1, C, T, h, w]")
    return obj[0] if obj.ndim == 5 else obj


def _text_features(obj, path):
    """A text feature file's dict -> (tokens [L, D], mask [L] bool, pooled [P])."""
    keys = ("prompt_embed", "prompt_attention_mask", "pooled_prompt_embed")
    if not isinstance(obj, dict) or not all(k in obj for k in keys):
        raise SystemExit(f"error: {path}: expected a dict with {', '.join(keys)}")
    tokens, mask, pooled = (obj[k] for k in keys)
    tokens = tokens[0] if tokens.ndim == 3 else tokens                         # [L, D]
    mask = (mask[0] if mask.ndim == 2 else mask).bool()                        # [L]
    pooled = pooled[0] if pooled.ndim == 2 else pooled                         # [P]
    if tokens.ndim != 2 or mask.shape != tokens.shape[:1] or pooled.ndim != 1:
        raise SystemExit(f"error: {path}: prompt_embed [1, L, D], prompt_attention_mask [1, L] and "
                         "pooled_prompt_embed [1, P] do not fit")
    return tokens, mask, pooled


def text_feature_dict(tokens, mask, pooled):
    """One caption's encoder output (tokens [1, L, D], mask [1, L], pooled [1, P]) -> the release's
    dict, its trailing padding dropped (batch() pads again to the batch's longest caption)."""
    length = int(mask[0].nonzero().max()) + 1 if mask[0].any() else 1
    return dict(prompt_embed=tokens[:, :length].to("cpu", STORE_DTYPE).contiguous(),
                prompt_attention_mask=mask[:, :length].cpu().bool(),
                pooled_prompt_embed=pooled.to("cpu", STORE_DTYPE))


# ----------------------------------------------------------------------------- extraction
def _name(text):
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def latent_name(entry):
    """latents/<stem>-<hash of the media path>.pt: readable, and unique per file."""
    path = media_path(entry)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(os.path.basename(path))[0])[:48]
    return os.path.join("latents", f"{stem}-{_name(path)}.pt")


def text_name(caption):
    """text/<hash of the caption>.pt: a caption that repeats is encoded and stored once."""
    return os.path.join("text", f"{_name(caption)}.pt")


def _check_bad(bad, total, what):
    if bad > MAX_BAD_FRACTION * total:
        raise SystemExit(f"error: {bad} of {total} {what} are missing, unreadable or too short; "
                         "check the paths and files (warnings above)")


@torch.no_grad()
def encode_texts(text_encoder, captions):
    """Captions -> the release's feature dict of each, TEXT_BATCH captions per encoder call."""
    out = []
    for i in range(0, len(captions), TEXT_BATCH):
        tokens, mask, pooled = text_encoder(captions[i:i + TEXT_BATCH])
        out += [text_feature_dict(tokens[j:j + 1], mask[j:j + 1], pooled[j:j + 1]) for j in range(len(tokens))]
    return out


def write_null_text(out_dir, text_encoder):
    """null_text.pt: the features of the empty caption, the null text of CFG and caption dropout
    (the release leaves it undefined on its extracted-feature path)."""
    path = os.path.join(out_dir, NULL_TEXT)
    if not os.path.exists(path):
        save_torch(path, encode_texts(text_encoder, [""])[0])
    return path


@torch.no_grad()
def extract(entries, out_dir, vae, text_encoder, height, width, frames, rank=0, world=1, progress=True,
            min_frames=None, fps=None):
    """Write this rank's share (entries i with i % world == rank) of latents and text features
    into out_dir and return the path of its shard jsonl (merge_shards joins them). Resumable:
    existing outputs are kept, not recomputed; each file appears atomically. Bad clips are
    skipped with a warning and counted; more than half of the share bad stops the run.
    min_frames, fps: as read_clip."""
    f, s = vae.cfg.temporal_factor, vae.cfg.spatial_factor
    if height % s or width % s:
        raise SystemExit(f"error: size {height}x{width} is not divisible by the VAE's spatial factor {s}")
    for sub in ("", "latents", "text"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        for leftover in os.scandir(os.path.join(out_dir, sub)):  # from this rank's interrupted run
            if f".rank{rank}.tmp" in leftover.name:
                os.remove(leftover.path)
    share = entries[rank::world]
    unusable = next((e for e in share if "text" not in e or not media_path(e)), None)
    if unusable is not None:
        raise SystemExit(f'error: extraction needs {{"video" or "image": path, "text": caption}}, got {unusable}')
    missing = sum(not os.path.isfile(media_path(e) or "") for e in share)
    if missing:
        warn(f"rank {rank}: {missing} of {len(share)} videos/images do not exist")
    _check_bad(missing, len(share), f"videos/images of rank {rank}")   # at start-up, not hours in
    if rank == 0:
        write_null_text(out_dir, text_encoder)

    captions = sorted({e["text"] for e in share if os.path.isfile(media_path(e) or "")
                       and not os.path.exists(os.path.join(out_dir, text_name(e["text"])))})
    for i in tqdm(range(0, len(captions), TEXT_BATCH), desc=f"text features (rank {rank})",
                  disable=not progress or not captions, leave=False):
        chunk = captions[i:i + TEXT_BATCH]
        for caption, feats in zip(chunk, encode_texts(text_encoder, chunk)):
            save_torch(os.path.join(out_dir, text_name(caption)), feats, rank)

    device = next(vae.parameters()).device
    lines, bad, reused = [], 0, 0
    for entry in tqdm(share, desc=f"latents (rank {rank})", disable=not progress):
        name = latent_name(entry)
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            reused += 1
            T = _latent(load_tensors(path, mmap=True), path).shape[1]             # header only
        else:
            try:
                clip = read_clip(entry, height, width, frames, f, min_frames, fps)  # [3, F, H, W]
            except BadClip as e:
                warn(str(e))
                bad += 1
                _check_bad(bad, len(share), f"videos/images of rank {rank}")
                continue
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                z = vae.normalize(vae.encode(clip[None].to(device), chunk=max(1, 16 // f)))  # [1, C, T, h, w]
            save_torch(path, z.to("cpu", STORE_DTYPE), rank)
            T = z.shape[2]
        lines.append(json.dumps({**entry, "latent": name, "text_fea": text_name(entry["text"]), "latent_frames": T}))
    shard = os.path.join(out_dir, SHARD.format(rank))
    save_text(shard, "".join(line + "\n" for line in lines), rank)
    print(f"rank {rank}: {len(lines)} of {len(share)} clips extracted ({reused} kept from an earlier run), "
          f"{bad} bad skipped -> {shard}")
    return shard


def merge_shards(out_dir, world):
    """extracted.jsonl from the ranks' shards (call on rank 0 after a barrier); returns its path."""
    lines = []
    for rank in range(world):
        shard = os.path.join(out_dir, SHARD.format(rank))
        if not os.path.isfile(shard):
            raise SystemExit(f"error: no {shard}: rank {rank} of {world} has not finished its extraction")
        with open(shard) as f:
            lines += [line for line in f if line.strip()]
    path = os.path.join(out_dir, EXTRACTED)
    save_text(path, "".join(lines))
    print(f"{len(lines)} clips -> {path}")
    return path


def extract_run(cfg):
    """train.py --task=extract: latents (the --vae_ckpt VAE) and text features (the --text_encoder
    encoder) of --data (a .jsonl annotation file or a folder) at the run's --size, --frame_width,
    --frames and --fps into --out_dir, sharded over the torchrun ranks; rank 0 then writes
    out_dir/extracted.jsonl. cfg: train.py's settings (config.Config)."""
    import text_encoders
    if not cfg.out_dir:
        raise SystemExit("error: --task=extract writes into --out_dir=PATH; name the folder")
    if not cfg.vae_ckpt or not cfg.text_encoder:
        raise SystemExit("error: --task=extract needs --vae_ckpt=PATH and --text_encoder=SPEC (minilm | hf:PATH | "
                         "t5clip:T5_DIR,CLIPL_DIR,CLIPG_DIR | sd3:DIR)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ddp, rank, world, device = setup_distributed(cfg.device)
    entries = load_entries(cfg.data)
    vae_model = load_vae(cfg.vae_ckpt).to(device)
    # T5-XXL is 4.7B parameters: bf16 on a GPU, as the features are stored
    encoder = text_encoders.load_text_encoder(cfg.text_encoder, dtype=torch.bfloat16 if device.type == "cuda" else None)
    extract(entries, cfg.out_dir, vae_model, encoder.to(device), cfg.size, cfg.frame_width or cfg.size, cfg.frames,
            rank=rank, world=world, progress=rank == 0, fps=cfg.fps or None)
    if ddp:
        torch.distributed.barrier()  # every shard is written
    if rank == 0:
        print(f"wrote {merge_shards(cfg.out_dir, world)}")


# ----------------------------------------------------------------------------- training data
class FeatureDataset:
    """Extracted latents and text features (an annotation file whose entries have "latent" and
    "text_fea"), bucketed by latent length: a batch draws from one bucket, so its clips stack
    without padding (the release buckets by temporal length too). max_latent_frames: longer clips
    are cut to their first latent frames, which the causal VAE computed from their first pixel
    frames only: the same latents a shorter extraction would give. Also a map-style dataset:
    dataset[i] and FeatureDataset.collate suit a torch DataLoader with a per-bucket batch_sampler."""

    def __init__(self, path: str, max_latent_frames: int | None = None):
        entries = load_entries(path)
        self.path, self.root, self.max_latent_frames = path, os.path.dirname(os.path.abspath(path)), max_latent_frames
        self.entries = [e for e in entries
                        if os.path.isfile(e.get("latent", "")) and os.path.isfile(e.get("text_fea", ""))]
        bad = len(entries) - len(self.entries)
        if bad:
            warn(f"{bad} of {len(entries)} entries of {path} lack their latent or text feature file; skipped")
        if bad > MAX_BAD_FRACTION * len(entries) or not self.entries:
            raise SystemExit(f"error: {bad} of {len(entries)} entries of {path} have no latent or text feature "
                             "file; extract them first (train.py --task=extract) or fix the paths")
        self.buckets = {}
        for i, e in enumerate(self.entries):
            # release files: header only
            T = e.get("latent_frames") or self._latent(i, mmap=True).shape[1]
            self.buckets.setdefault(min(int(T), max_latent_frames or int(T)), []).append(i)
        first = self[0]
        self.latent_channels, self.latent_size = first["latent"].shape[0], tuple(first["latent"].shape[2:])
        self.text_dim, self.pooled_dim = first["text"].shape[1], first["pooled"].shape[0]

    def __len__(self):
        return len(self.entries)

    def _latent(self, i, mmap=False):
        path = self.entries[i]["latent"]
        return _latent(load_tensors(path, mmap), path)                         # [C, T, h, w]

    def __getitem__(self, i):
        """dict(latent [C, T, h, w], text [L, D], text_mask [L] bool, pooled [P]), float32."""
        path = self.entries[i]["text_fea"]
        tokens, mask, pooled = _text_features(load_tensors(path), path)
        latent = self._latent(i)[:, :self.max_latent_frames]
        return dict(latent=latent.float(), text=tokens.float(), text_mask=mask, pooled=pooled.float())

    @staticmethod
    def collate(items):
        """Samples of one bucket -> dict(latents [B, C, T, h, w], text [B, L, D], text_mask [B, L]
        bool, pooled [B, P]); text padded with zeros to the longest caption, mask False there."""
        shapes = {tuple(x["latent"].shape) for x in items}
        if len(shapes) > 1:
            raise ValueError(f"latent shapes differ in one batch: {sorted(shapes)}; draw a batch from one bucket")
        L, D = max(len(x["text"]) for x in items), items[0]["text"].shape[1]
        text = torch.zeros(len(items), L, D)
        mask = torch.zeros(len(items), L, dtype=torch.bool)
        for j, x in enumerate(items):
            text[j, :len(x["text"])], mask[j, :len(x["text"])] = x["text"], x["text_mask"]
        return dict(latents=torch.stack([x["latent"] for x in items]), text=text, text_mask=mask,
                    pooled=torch.stack([x["pooled"] for x in items]))

    def batch(self, indices, latent_frames=None):
        """Entries of one bucket -> collate()'s dict. latent_frames: cut every clip to its first
        latent frames first, so entries of any buckets with at least that many batch together
        (latent_frames=1: images, also from the first frames of videos)."""
        items = [self[i] for i in indices]
        for x in items:
            x["latent"] = x["latent"][:, :latent_frames]
        return self.collate(items)

    def draw(self, batch_size, generator, latent_frames=None):
        """A random batch from the bucket of `latent_frames` latent frames, or from a bucket drawn
        in proportion to its size."""
        if latent_frames is None:
            sizes = torch.tensor([len(b) for b in self.buckets.values()], dtype=torch.float)
            latent_frames = list(self.buckets)[int(torch.multinomial(sizes, 1, generator=generator))]
        bucket = self.buckets.get(latent_frames)
        if not bucket:
            raise SystemExit(f"error: no clips of {latent_frames} latent frames in {self.path} "
                             f"(buckets: {sorted(self.buckets)})")
        picks = torch.randint(len(bucket), (batch_size,), generator=generator)
        return self.batch([bucket[j] for j in picks.tolist()])

    def null_text(self):
        """(text [1, L, D], mask [1, L] bool, pooled [1, P]) of the empty caption, from null_text.pt."""
        path = os.path.join(self.root, NULL_TEXT)
        if not os.path.isfile(path):
            raise SystemExit(f"error: no {path}: the features of the empty caption, which the extraction "
                             "writes (video_data.write_null_text, with the same text encoder)")
        tokens, mask, pooled = _text_features(load_tensors(path), path)
        return tokens[None].float(), mask[None], pooled[None].float()
