"""Real data for the paper's recipe: captioned videos and images and their pre-extracted features.

App. B of Jin et al., "Pyramidal Flow Matching for Efficient Video Generative Modeling" (ICLR
2025) trains on captioned videos (and images: one-frame clips) whose VAE latents and T5/CLIP text
features are extracted once beforehand, as the authors' release does, so that training runs the
DiT only. This file reads and writes the release's format:

- annotation file, JSON lines: {"video": path, "text": caption} or {"image": path, "text": ...},
  optionally with "latent" and "text_fea", the paths of the extracted tensors. Relative paths
  resolve against the annotation file's folder (else, as the release's files, the working
  directory). Or a folder of videos and images, each with a same-named UTF-8 .txt caption.
- latent file: torch.save of the clip's normalised VAE latents [1, C, T, h, w] (an image: T = 1).
- text feature file: torch.save of dict(prompt_embed [1, L, D], prompt_attention_mask [1, L],
  pooled_prompt_embed [1, P]).

load_entries checks each entry where it enters; video_decode.read_clip turns one into pixels;
extract (train.py --task=extract) writes the features, sharded over ranks without a collective,
resumable, recording what made its folder, and an annotation file pointing at them (with keys of
ours, "latent_frames", "latent_shape" and "text_dims", so that loading it reads no tensor);
FeatureDataset checks them and serves batches, bucketed by latent length. Every tensor file is
read with torch.load(weights_only=True) (or safetensors): a file from elsewhere can hold tensors,
never code. A bad entry or file is named in one line and skipped; more than MAX_BAD_FRACTION of
a run bad stops it.

Tensor legend: one clip [3, F, H, W] (pixels in [-1, 1], F pixel frames); latents [B, C, T, h, w];
tokens [B, L, D].
"""
import dataclasses
import hashlib
import json
import os
import pickle
import re
import sys
from collections import Counter

import torch
from tqdm import tqdm

import dit
import pyramid_flow as pf
from common import DataError, fail, first_line, load_vae, out_dir_lock, save_text, save_torch, setup_distributed
from vae import VAE_SIZES, normalize_release
from video_decode import BadClip, media_path, read_clip

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# resolved against the annotation file's folder (_path_root)
PATH_KEYS = ("video", "image", "latent", "text_fea")
MAX_BAD_FRACTION = 0.5   # more bad entries than this: the data, not a few files, is broken; stop
# extracted tensors on disk: half of float32, the precision bf16 training uses
STORE_DTYPE = torch.bfloat16
TEXT_BATCH = 32          # captions per text-encoder call during extraction
# entries without recorded widths (the release's) whose text headers the scan reads; later ones are
# checked as they load (a header costs about 1.5 ms: a million would take most of an hour)
TEXT_PROBES = 64
NULL_TEXT = "null_text.pt"   # features of "" (the null caption of CFG and caption dropout)
SHARD = "extracted.rank{}.jsonl"  # a rank's share; extracted.rank<r>.done says it is finished
RECORD = "extraction.json"    # what made an extraction folder (check_record)
# pixel frames a VAE encoder call takes (vae.posterior's chunk): 2 latent frames at f = 8 keep the
# release's VAE at 768p to 3.8 GiB of activations (56.5 GiB for 241 frames in one call)
ENCODE_FRAMES = 16
EXTRACTED = "extracted.jsonl"


class BadFeature(DataError):
    """An unreadable, misshapen or non-finite feature file; the message is one line naming it."""


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- annotations
class BadEntries:
    """Bad entries (annotation lines, captions, feature files) of one run: each named in one
    warning line (the first WARN_LIMIT of them, then a count), skipped, and counted against
    MAX_BAD_FRACTION of the whole run, so every rank takes the same decision."""
    WARN_LIMIT = 20

    def __init__(self, what):
        self.what, self.count = what, 0

    def add(self, message):
        self.count += 1
        if self.count <= self.WARN_LIMIT:
            warn(f"{message}; skipped")

    def check(self, total, hint=""):
        """Warn the count; stop with one line if more than MAX_BAD_FRACTION of `total` are bad."""
        if not self.count:
            return
        more = f" ({self.count - self.WARN_LIMIT} not listed)" if self.count > self.WARN_LIMIT else ""
        warn(f"{self.count} of {total} {self.what} skipped{more}")
        if self.count > MAX_BAD_FRACTION * total or self.count == total:
            raise SystemExit(f"error: {self.count} of {total} {self.what} are bad (warnings above): "
                             f"more than {MAX_BAD_FRACTION:.0%}, the data is broken, not a few files{hint}")


def entry_problem(entry):
    """Why an annotation entry is unusable (None if it is fine): a JSON object with a caption
    ("text": a string, or "text_fea") and one file ("video" or "image", or "latent"), paths strings."""
    if not isinstance(entry, dict):
        return f"not a JSON object but {type(entry).__name__}"
    if "video" in entry and "image" in entry:
        return 'has both "video" and "image"; an entry is one file'
    for key in PATH_KEYS:
        if key in entry and not (isinstance(entry[key], str) and entry[key]):
            return f'"{key}" must be a path (a non-empty string), got {json.dumps(entry[key])[:40]}'
    if "text" in entry and not isinstance(entry["text"], str):
        return f'"text" must be a caption (a string), got {json.dumps(entry["text"])[:40]}'
    if not ({"text", "text_fea"} & entry.keys()) or not ({"video", "image", "latent"} & entry.keys()):
        return 'expected {"video" or "image": path, "text": caption}'
    return None


def load_entries(path: str) -> list[dict]:
    """A .jsonl annotation file or a folder of media with .txt captions -> entries with absolute
    paths. Each line is checked here (UTF-8, JSON, the keys and their types): a bad one is named
    (file:line) and skipped, and more than MAX_BAD_FRACTION bad stops the run. Relative paths
    resolve against the annotation file's folder, or, if none of them exists there but some do
    from the working directory (the release's files), against the working directory (said in
    one line)."""
    if os.path.isdir(path):
        return _folder_entries(path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: no annotation file or folder at {path}")
    entries, bad, total = [], BadEntries(f"entries of {path}"), 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            total += 1
            try:
                entry = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad.add(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            except json.JSONDecodeError as e:
                bad.add(f"{path}:{n}: not a JSON object ({e.msg})")
                continue
            problem = entry_problem(entry)
            if problem:
                bad.add(f"{path}:{n}: {problem}")
                continue
            entries.append(entry)
    if not total:
        raise SystemExit(f"error: {path} has no entries")
    bad.check(total)
    root = _path_root(path, entries)
    for entry in entries:
        for key in PATH_KEYS & entry.keys():
            # an absolute path stays
            entry[key] = os.path.normpath(os.path.join(root, entry[key]))
    return entries


def _path_root(path, entries, probe=64):
    """The folder relative paths of `path` resolve against: the annotation file's, unless none of
    the first `probe` relative paths exists there and some exist from the working directory."""
    here = os.path.dirname(os.path.abspath(path))
    relative = [e[k] for e in entries for k in PATH_KEYS if k in e and not os.path.isabs(e[k])][:probe]
    if not relative or any(os.path.exists(os.path.join(here, p)) for p in relative):
        return here
    cwd = os.getcwd()
    if any(os.path.exists(os.path.join(cwd, p)) for p in relative):
        print(f"note: the relative paths of {path} resolve against the working directory {cwd} "
              f"(none of them exists beside the annotation file)")
        return cwd
    return here


def _folder_entries(folder):
    """Every video and image under `folder` (sorted) whose same-named .txt caption exists (UTF-8)."""
    entries, uncaptioned, bad, total = [], 0, BadEntries(f"captions in {folder}"), 0
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
            total += 1
            with open(caption, "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                bad.add(f"{caption}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})")
                continue
            kind = "video" if ext.lower() in VIDEO_EXTS else "image"
            entries.append({kind: os.path.abspath(os.path.join(root, name)), "text": text})
    if uncaptioned:
        warn(f"{uncaptioned} videos/images in {folder} have no same-named .txt caption; skipped")
    if not entries and not bad.count:
        raise SystemExit(f"error: no captioned videos or images in {folder} (each needs NAME.txt beside it)")
    bad.check(total)
    return entries


# ----------------------------------------------------------------------------- tensor files
def load_tensors(path, mmap=False):
    """torch.load(weights_only=True) or safetensors; BadFeature (one line) for a file that is
    truncated, not a tensor file, or would need to run code to load (an untrusted pickle).
    mmap: read tensor data only when touched."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise BadFeature(f"refused {path}: not a plain tensor file (loading it would run code from it); "
                         "torch.load(weights_only=True) reads tensors only") from None
    except Exception as e:  # noqa: BLE001 - truncated, or not a torch file at all: readers raise many kinds
        raise BadFeature(f"cannot read {path}: {first_line(e)[:120]}") from None


def _latent(obj, path):
    """A latent file's content -> [C, T, h, w] (a safetensors file holds one tensor)."""
    if isinstance(obj, dict) and len(obj) == 1:
        obj = next(iter(obj.values()))
    if not torch.is_tensor(obj) or obj.ndim not in (4, 5) or (obj.ndim == 5 and obj.shape[0] != 1):
        raise BadFeature(f"{path}: expected a latent tensor [1, C, T, h, w]")
    return obj[0] if obj.ndim == 5 else obj


def _text_features(obj, path):
    """A text feature file's dict -> (tokens [L, D], mask [L] bool, pooled [P])."""
    keys = ("prompt_embed", "prompt_attention_mask", "pooled_prompt_embed")
    if not isinstance(obj, dict) or not all(torch.is_tensor(obj.get(k)) for k in keys):
        raise BadFeature(f"{path}: expected a dict with {', '.join(keys)}")
    tokens, mask, pooled = (obj[k] for k in keys)
    tokens = tokens[0] if tokens.ndim == 3 else tokens                         # [L, D]
    mask = (mask[0] if mask.ndim == 2 else mask).bool()                        # [L]
    pooled = pooled[0] if pooled.ndim == 2 else pooled                         # [P]
    if tokens.ndim != 2 or mask.shape != tokens.shape[:1] or pooled.ndim != 1:
        raise BadFeature(f"{path}: prompt_embed [1, L, D], prompt_attention_mask [1, L] and "
                         "pooled_prompt_embed [1, P] do not fit")
    return tokens, mask, pooled


def _finite(path, *tensors):
    if not all(bool(torch.isfinite(x.float()).all()) for x in tensors):
        raise BadFeature(f"{path}: holds NaN or infinite values")


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


def fingerprint(module):
    """What identifies a network's weights, cheaply: names, shapes and a strided sample of at most
    1024 values of every tensor, rounded to bf16 (the same for a bf16 copy on a GPU), hashed."""
    h = hashlib.sha1()
    for name, x in module.state_dict().items():
        flat = x.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 1024)][:1024].to("cpu", torch.bfloat16).float()
        h.update(f"{name}{tuple(x.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_grid(height, width, frames, vae_cfg, K, patch):
    """Before any work, for extraction and for every phase of a run: frames the VAE takes, a
    frame size its spatial factor divides, and latents the pyramid halves K - 1 times into patches."""
    s = vae_cfg.spatial_factor
    try:
        vae_cfg.latent_frames(frames)
    except ValueError as e:
        fail(f"--frames={frames} {e}")
    if height % s or width % s:
        fail(f"--size={height}, --frame_width={width}: a frame's sides must be multiples of {s}, the VAE's "
             f"spatial factor")
    try:
        lowest = pf.stage_shape((height // s, width // s), K - 1)
    except ValueError as e:
        fail(f"{height}x{width} pixels are {height // s}x{width // s} latents: {e}")
    if lowest[0] % patch or lowest[1] % patch:
        fail(f"{height}x{width} pixels: the lowest of K = {K} stages is {lowest[0]}x{lowest[1]} latents, not a "
             f"multiple of the patch {patch} (--size, --frame_width, --K, --patch)")


def check_training_data(cfg, path, patch):
    """Before any phase of a run on extracted features works (train.main checks every phase
    first): the grid of its settings (check_grid, with the compression of --vae_size) and, unless
    path is None (a dry run), the annotation file and the null caption's features beside it."""
    check_grid(cfg.size, cfg.frame_width or cfg.size, cfg.frames, VAE_SIZES[cfg.vae_size], cfg.K, patch)
    if path is None:
        return
    if not os.path.isfile(path):
        fail(f"no annotation file {path} (--data); make it with python train.py --task=extract")
    null = os.path.join(os.path.dirname(os.path.abspath(path)), NULL_TEXT)
    if not os.path.isfile(null):
        fail(f"no {null}: the features of the empty caption (CFG); write it with python train.py --task=extract "
             f"--null_text_only=true --text_encoder=SPEC --out_dir={os.path.dirname(null)}")


@torch.no_grad()
def encode_texts(text_encoder, captions):
    """Captions -> the release's feature dict of each, TEXT_BATCH captions per encoder call."""
    out = []
    for i in range(0, len(captions), TEXT_BATCH):
        tokens, mask, pooled = text_encoder(captions[i:i + TEXT_BATCH])
        out += [text_feature_dict(tokens[j:j + 1], mask[j:j + 1], pooled[j:j + 1]) for j in range(len(tokens))]
    return out


def text_problem(path, text_dim, pooled_dim):
    """Why the text feature file at `path` cannot be kept (None: it can): unreadable, another
    encoder's widths, or not finite."""
    try:
        tokens, _, pooled = _text_features(load_tensors(path), path)
        if (tokens.shape[1], pooled.shape[0]) != (text_dim, pooled_dim):
            return f"{path}: {tokens.shape[1]}- and {pooled.shape[0]}-wide, not {text_dim} and {pooled_dim}"
        _finite(path, tokens, pooled)
    except BadFeature as e:
        return str(e)
    return None


def write_null_text(out_dir, feats, rank=None):
    """null_text.pt: the features of the empty caption (`feats`, encode_texts(encoder, [""])[0]),
    the null text of CFG and caption dropout (the release leaves it undefined on its
    extracted-feature path); rewritten unless it is this encoder's. Returns (path, feats)."""
    path = os.path.join(out_dir, NULL_TEXT)
    dims = feats["prompt_embed"].shape[-1], feats["pooled_prompt_embed"].shape[-1]
    if not os.path.exists(path) or text_problem(path, *dims):
        save_torch(path, feats, rank)
    return path, feats


def extraction_record(vae, text_encoder, null, height, width, frames, fps, min_frames):
    """What makes an extraction folder's files (RECORD): sizes, frames, fps, and the VAE's and the
    text encoder's identities (config, widths, weights' fingerprint)."""
    record = dict(height=height, width=width, frames=frames, fps=fps, min_frames=min_frames,
                  vae=dict(config=dataclasses.asdict(vae.cfg), weights=fingerprint(vae)),
                  text_encoder=dict(kind=type(text_encoder).__name__, weights=fingerprint(text_encoder),
                                    text_dim=null["prompt_embed"].shape[-1],
                                    pooled_dim=null["pooled_prompt_embed"].shape[-1]))
    return json.loads(json.dumps(record))  # as read back (tuples become lists)


def check_record(out_dir, record, rank):
    """Write out_dir/RECORD, or refuse (one line) a folder extracted with other settings."""
    path = os.path.join(out_dir, RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
        changed = [k if isinstance(record[k], dict) else f"{k} {old.get(k)} -> {record[k]}"
                   for k in record if old.get(k) != record[k]]
        if changed:
            raise SystemExit(f"error: {out_dir} holds an extraction made with other settings ({'; '.join(changed)}"
                             f": see {path}); extract into another --out_dir, or delete that folder to start again")
    else:
        save_text(path, json.dumps(record, indent=1), rank)


def _done_path(out_dir, rank):
    return os.path.join(out_dir, SHARD.format(rank).replace(".jsonl", ".done"))


@torch.no_grad()
def extract(entries, out_dir, vae, text_encoder, height, width, frames, rank=0, world=1, progress=True,
            min_frames=None, fps=None):
    """Write this rank's share (entries i with i % world == rank) of latents and text features
    into out_dir and return the path of its shard jsonl (merge_shards joins them). The folder
    records what made it (RECORD) and refuses other settings; each rank holds a lock in it.
    Resumable: existing outputs are kept if they are whole and of this extraction's shapes, else
    made again (said so); each file appears atomically. Bad clips are skipped with a warning and
    counted; the shard's .done file carries the count, which the merge checks for the whole run.
    min_frames, fps: as read_clip."""
    s = vae.cfg.spatial_factor
    try:
        latent_frames = vae.cfg.latent_frames(frames)
    except ValueError as e:
        raise SystemExit(f"error: --frames={frames} {e}") from None
    if height % s or width % s:
        raise SystemExit(f"error: size {height}x{width} is not divisible by the VAE's spatial factor {s}")
    unusable = next((e for e in entries if "text" not in e or not media_path(e)), None)
    if unusable is not None:
        raise SystemExit(f'error: extraction needs {{"video" or "image": path, "text": caption}}, got {unusable}')
    os.makedirs(out_dir, exist_ok=True)
    with out_dir_lock(out_dir, "extraction", name=f"lock.rank{rank}", every_rank=True):
        for sub in ("", "latents", "text"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
            for leftover in os.scandir(os.path.join(out_dir, sub)):  # from this rank's interrupted run
                if f".rank{rank}.tmp" in leftover.name:
                    os.remove(leftover.path)
        if os.path.exists(_done_path(out_dir, rank)):
            os.remove(_done_path(out_dir, rank))
        # the whole run's missing files, the same on every rank: every rank decides alike, at start-up
        missing = BadEntries("videos/images (missing files)")
        for e in entries:
            if not os.path.isfile(media_path(e)):
                missing.add(f"missing file {media_path(e)}")
        missing.check(len(entries))
        null = encode_texts(text_encoder, [""])[0]
        check_record(out_dir, extraction_record(vae, text_encoder, null, height, width, frames, fps, min_frames), rank)
        write_null_text(out_dir, null, rank)  # after the record: another extraction's stays
        dims = null["prompt_embed"].shape[-1], null["pooled_prompt_embed"].shape[-1]
        return _extract_share(entries, out_dir, vae, text_encoder, height, width, frames, rank, world, progress,
                              min_frames, fps, dims, latent_frames, missing.count)


def _extract_share(entries, out_dir, vae, text_encoder, height, width, frames, rank, world, progress, min_frames,
                   fps, dims, latent_frames, missing):
    f, s = vae.cfg.temporal_factor, vae.cfg.spatial_factor
    share = [e for e in entries[rank::world] if os.path.isfile(media_path(e))]
    todo = set()
    for caption in {e["text"] for e in share}:
        path = os.path.join(out_dir, text_name(caption))
        problem = os.path.exists(path) and text_problem(path, *dims)
        if problem:
            warn(f"extracting again: {problem}")
        if problem or not os.path.exists(path):
            todo.add(caption)
    captions = sorted(todo)
    for i in tqdm(range(0, len(captions), TEXT_BATCH), desc=f"text features (rank {rank})",
                  disable=not progress or not captions, leave=False):
        chunk = captions[i:i + TEXT_BATCH]
        for caption, feats in zip(chunk, encode_texts(text_encoder, chunk)):
            save_torch(os.path.join(out_dir, text_name(caption)), feats, rank)

    device = next(vae.parameters()).device
    shape = (vae.cfg.latent_channels, height // s, width // s)
    lines, bad, reused = [], 0, 0
    for entry in tqdm(share, desc=f"latents (rank {rank})", disable=not progress):
        name = latent_name(entry)
        path = os.path.join(out_dir, name)
        T = _kept_latent(path, shape, latent_frames) if os.path.exists(path) else None
        if T:
            reused += 1
        else:
            try:
                clip = read_clip(entry, height, width, frames, f, min_frames, fps)  # [3, F, H, W]
            except BadClip as e:
                warn(str(e))
                bad += 1
                if missing + bad > MAX_BAD_FRACTION * len(entries):  # the whole run is past the limit already
                    raise SystemExit(f"error: {missing + bad} of {len(entries)} videos/images of the run are missing, "
                                     "unreadable or too short (warnings above); check the files") from None
                continue
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                z = vae.normalize(vae.encode(clip[None].to(device), chunk=max(1, ENCODE_FRAMES // f)))  # [1, C, T, h, w]
            save_torch(path, z.to("cpu", STORE_DTYPE), rank)
            T = z.shape[2]
        lines.append(json.dumps({**entry, "latent": name, "text_fea": text_name(entry["text"]), "latent_frames": T,
                                 "latent_shape": [shape[0], T, *shape[1:]], "text_dims": list(dims)}))
    shard = os.path.join(out_dir, SHARD.format(rank))
    save_text(shard, "".join(line + "\n" for line in lines), rank)
    save_text(_done_path(out_dir, rank), json.dumps(dict(run=run_key(entries, world), clips=len(entries[rank::world]),
                                                         # this share's missing files count as bad
                                                         extracted=len(lines),
                                                         bad=bad + len(entries[rank::world]) - len(share))), rank)
    print(f"rank {rank}: {len(lines)} of {len(entries[rank::world])} clips extracted ({reused} already on disk and "
          f"whole), {bad} bad skipped -> {shard}")
    return shard


def _kept_latent(path, shape, latent_frames):
    """The latent frames of an existing latent file if it can be kept (whole, this extraction's
    channels and size, finite), else None (said so: it is extracted again)."""
    try:
        z = _latent(load_tensors(path), path)                                   # [C, T, h, w]
        if (z.shape[0], *z.shape[2:]) != shape or not 1 <= z.shape[1] <= latent_frames:
            raise BadFeature(f"{path}: shape {tuple(z.shape)}, not [{shape[0]}, T <= {latent_frames}, "
                             f"{shape[1]}, {shape[2]}]")
        _finite(path, z)
        return z.shape[1]
    except BadFeature as e:
        warn(f"extracting again: {e}")
        return None


def run_key(entries, world):
    """Which run a shard belongs to: its annotation entries and world size."""
    return hashlib.sha1(json.dumps([entries, world], sort_keys=True).encode()).hexdigest()[:16]


def unfinished_ranks(out_dir, world, key=None):
    """The ranks whose shard of this run (`key`: run_key) is not done."""
    out = []
    for rank in range(world):
        try:
            with open(_done_path(out_dir, rank)) as f:
                done = json.load(f)
        except (OSError, ValueError):
            out.append(rank)
            continue
        if key is not None and done.get("run") != key:
            out.append(rank)
    return out


def merge_shards(out_dir, world, key=None, rank=None):
    """extracted.jsonl from the ranks' shards once each is done (no collective: whichever rank
    finishes last merges); a missing shard, or more than MAX_BAD_FRACTION bad clips in the whole
    run, is one line. Returns its path."""
    missing = unfinished_ranks(out_dir, world, key)
    if missing:
        raise SystemExit(f"error: rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {world} "
                         f"did not finish {os.path.join(out_dir, SHARD.format('N'))}; run the same command again "
                         f"(finished files are kept)")
    lines, bad, clips = [], 0, 0
    for r in range(world):
        with open(_done_path(out_dir, r)) as f:
            done = json.load(f)
        bad, clips = bad + done["bad"], clips + done["clips"]
        with open(os.path.join(out_dir, SHARD.format(r))) as f:
            lines += [line for line in f if line.strip()]
    if bad > MAX_BAD_FRACTION * clips:
        raise SystemExit(f"error: {bad} of {clips} videos/images are missing, unreadable or too short (warnings "
                         "above); check the files")
    path = os.path.join(out_dir, EXTRACTED)
    save_text(path, "".join(lines), rank)
    print(f"{len(lines)} clips -> {path}")
    return path


def extract_run(cfg):
    """train.py --task=extract: latents (the --vae_ckpt VAE) and text features (the --text_encoder
    encoder) of --data (a .jsonl annotation file or a folder) at the run's --size, --frame_width,
    --frames and --fps into --out_dir, sharded over the torchrun ranks without a collective: each
    rank writes its shard, and the last to finish writes out_dir/extracted.jsonl. Every setting
    is checked before work. --null_text_only=true writes only out_dir/null_text.pt (no --data,
    no VAE): the null caption for a release's extracted features. cfg: train.py's settings."""
    import text_encoders
    if not cfg.out_dir:
        raise SystemExit("error: --task=extract writes into --out_dir=PATH; name the folder")
    specs = "minilm | hf:PATH | t5clip:T5_DIR,CLIPL_DIR,CLIPG_DIR | sd3:DIR"
    if getattr(cfg, "null_text_only", False):
        if not cfg.text_encoder:
            raise SystemExit(f"error: --null_text_only=true needs --text_encoder=SPEC ({specs})")
        encoder = text_encoders.load_text_encoder(cfg.text_encoder)
        os.makedirs(cfg.out_dir, exist_ok=True)
        null = encode_texts(encoder, [""])[0]
        if os.path.isfile(os.path.join(cfg.out_dir, RECORD)):  # our extraction's folder: its encoder only
            with open(os.path.join(cfg.out_dir, RECORD)) as f:
                made = json.load(f).get("text_encoder", {}).get("weights")
            if made != fingerprint(encoder):
                raise SystemExit(f"error: {cfg.out_dir} was extracted with another text encoder (see its {RECORD}); "
                                 f"its null_text.pt is kept")
        print(f"wrote {write_null_text(cfg.out_dir, null)[0]} (the features of the empty caption)")
        return
    if not cfg.vae_ckpt or not cfg.text_encoder:
        raise SystemExit(f"error: --task=extract needs --vae_ckpt=PATH and --text_encoder=SPEC ({specs})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    entries = load_entries(cfg.data)
    height, width = cfg.size, cfg.frame_width or cfg.size
    vae_model = load_vae(cfg.vae_ckpt)
    check_grid(height, width, cfg.frames, vae_model.cfg, cfg.K, cfg.patch or dit.SIZES[cfg.model].patch_size)
    ddp, rank, world, device = setup_distributed(cfg.device)
    # T5-XXL is 4.7B parameters: bf16 on a GPU, as the features are stored
    encoder = text_encoders.load_text_encoder(cfg.text_encoder, dtype=torch.bfloat16 if device.type == "cuda" else None)
    extract(entries, cfg.out_dir, vae_model.to(device), encoder.to(device), height, width, cfg.frames,
            rank=rank, world=world, progress=rank == 0, fps=cfg.fps or None)
    waiting = unfinished_ranks(cfg.out_dir, world, run_key(entries, world))
    if waiting:
        print(f"rank {rank}: done; rank(s) {', '.join(map(str, waiting))} still extracting (the last to finish "
              f"writes {os.path.join(cfg.out_dir, EXTRACTED)})")
    else:
        print(f"wrote {merge_shards(cfg.out_dir, world, run_key(entries, world), rank)}")


# ----------------------------------------------------------------------------- training data
class FeatureDataset:
    """Extracted latents and text features (an annotation file whose entries have "latent" and
    "text_fea"), bucketed by latent length: a batch draws from one bucket, so its clips stack
    without padding (the release buckets by temporal length too). max_latent_frames: longer clips
    are cut to their first latent frames, which the causal VAE computed from their first pixel
    frames only: the same latents a shorter extraction would give. Also a map-style dataset:
    dataset[i] and FeatureDataset.collate suit a torch DataLoader with a per-bucket batch_sampler.

    Checked up front, in one pass that names every bad file (scan): the files exist and their
    shapes agree (latent channels and size, text widths: the shapes the extraction recorded in
    the annotation, else the files' headers). A file found bad when it loads (truncated, another
    shape, NaN or infinite values) is named once and replaced by the next good clip of its bucket,
    the same one on every run (resume stays exact); past MAX_BAD_FRACTION of the data set bad, or
    a bucket with no good clip left, it raises BadFeature, which the training loop turns into a
    checkpoint of the last good step and one line."""

    def __init__(self, path: str, max_latent_frames: int | None = None):
        entries = load_entries(path)
        self.path, self.root, self.max_latent_frames = path, os.path.dirname(os.path.abspath(path)), max_latent_frames
        bad = BadEntries(f"entries of {path}")
        scanned, probes = [], 0
        for e in tqdm(entries, desc="checking features", disable=len(entries) < 10_000, leave=False):
            problem, shape, dims = self.scan(e, read_text=probes < TEXT_PROBES)
            probes += not e.get("text_dims")
            if problem:
                bad.add(problem)
            else:
                scanned.append((e, shape, dims))
        # the data set's shapes: those of most files; a file of others is another extraction's
        size = Counter((s[0], *s[2:]) for _, s, _ in scanned).most_common(1)
        width = Counter(d for _, _, d in scanned if d).most_common(1)
        self.entries, latent_frames = [], []
        for e, shape, dims in scanned:
            if (shape[0], *shape[2:]) != size[0][0] or dims not in (None, width[0][0]):
                bad.add(f"{e['latent']}: latents {list(shape)} and text widths {list(dims)}, while most files of "
                        f"{path} have [C, h, w] = {list(size[0][0])} and widths {list(width[0][0])}")
            else:
                self.entries.append(e)
                latent_frames.append(shape[1])
        bad.check(len(entries), "; extract them first (train.py --task=extract) or fix the paths")
        (C, h, w), (self.text_dim, self.pooled_dim) = size[0][0], width[0][0]
        self.latent_channels, self.latent_size = C, (h, w)
        self.total, self.bad_found = len(entries), {}
        self.buckets, self.bucket_of = {}, []
        for i, T in enumerate(latent_frames):
            T = min(int(T), max_latent_frames or int(T))
            self.bucket_of.append((T, len(self.buckets.setdefault(T, []))))
            self.buckets[T].append(i)
        self.scan_bad = bad.count
        raw = sum("latent_frames" not in e for e in self.entries)
        if raw:  # release-format files: written by the release's extraction, not this repo's
            print(f"note: {raw} of {len(self.entries)} entries of {path} carry no record of this repo's extraction: "
                  f"their latents are read as the release's raw VAE samples and normalised with its shift and scale "
                  f"(vae.normalize_release); this repo's extraction stores them normalised")

    @staticmethod
    def scan(e, read_text=True):
        """(problem or None, latent shape [C, T, h, w], text widths (D, P)) of one entry, from what
        the extraction recorded in it, else from its files' headers (memory-mapped: no data read;
        read_text=False: widths None, checked as the file loads)."""
        for key in ("latent", "text_fea"):
            if not os.path.isfile(e.get(key, "")):
                return f"{e.get(key) or 'an entry'}: no such {key} file", None, None
        try:
            shape = e.get("latent_shape") or _latent(load_tensors(e["latent"], mmap=True), e["latent"]).shape
            dims = e.get("text_dims")
            if not dims and read_text:
                tokens, _, pooled = _text_features(load_tensors(e["text_fea"], mmap=True), e["text_fea"])
                dims = (tokens.shape[1], pooled.shape[0])
            shape = tuple(int(x) for x in shape)
            dims = tuple(int(x) for x in dims) if dims else None  # None: checked as the file loads
        except BadFeature as error:
            return str(error), None, None
        except (TypeError, ValueError):  # an annotation's own numbers, written by hand or damaged
            shape, dims = (), ()
        if len(shape) != 4 or (dims is not None and len(dims) != 2) or min(shape + (dims or ())) < 1:
            return f"{e['latent']}: latent_shape / text_dims of its entry are not [C, T, h, w] / [D, P]", None, None
        return None, shape, dims

    def __len__(self):
        return len(self.entries)

    def load(self, i):
        """Entry i's features, checked: dict(latent [C, T, h, w], text [L, D], text_mask [L] bool,
        pooled [P]), float32; BadFeature naming the file if one is unreadable, of another shape
        than the data set's, or not finite."""
        e, (T, _) = self.entries[i], self.bucket_of[i]
        latent = _latent(load_tensors(e["latent"]), e["latent"])[:, :self.max_latent_frames]
        if (latent.shape[0], *latent.shape[2:]) != (self.latent_channels, *self.latent_size) or latent.shape[1] < T:
            raise BadFeature(f"{e['latent']}: shape {list(latent.shape)}, not [{self.latent_channels}, {T}, "
                             f"{self.latent_size[0]}, {self.latent_size[1]}] as recorded")
        tokens, mask, pooled = _text_features(load_tensors(e["text_fea"]), e["text_fea"])
        if (tokens.shape[1], pooled.shape[0]) != (self.text_dim, self.pooled_dim):
            raise BadFeature(f"{e['text_fea']}: {tokens.shape[1]}- and {pooled.shape[0]}-wide text features, "
                             f"not {self.text_dim} and {self.pooled_dim}")
        _finite(e["latent"], latent)
        _finite(e["text_fea"], tokens, pooled)
        if "latent_frames" not in e:  # not this repo's extraction: the release's raw VAE samples
            latent = normalize_release(latent.float())
        return dict(latent=latent.float(), text=tokens.float(), text_mask=mask, pooled=pooled.float())

    def __getitem__(self, i):
        """load(i), or, if its files are bad (named once), the next good clip of its bucket."""
        T, position = self.bucket_of[i]
        bucket = self.buckets[T]
        for j in (bucket[(position + n) % len(bucket)] for n in range(len(bucket))):
            if j in self.bad_found:
                continue
            try:
                return self.load(j)
            except BadFeature as e:
                self.bad_found[j] = str(e)
                warn(f"{e}; skipped, another clip of {T} latent frames in its place")
            if self.scan_bad + len(self.bad_found) > MAX_BAD_FRACTION * self.total:
                raise BadFeature(f"{self.scan_bad + len(self.bad_found)} of {self.total} entries of {self.path} "
                                 "are bad (warnings above): the data is broken, not a few files")
        raise BadFeature(f"every clip of {T} latent frames in {self.path} is bad (warnings above)")

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
        how = ("write it with python train.py --task=extract --null_text_only=true --text_encoder=SPEC "
               f"--out_dir={self.root}, SPEC the encoder that made the features")
        if not os.path.isfile(path):
            raise SystemExit(f"error: no {path}: the features of the empty caption (CFG); {how}")
        try:
            tokens, mask, pooled = _text_features(load_tensors(path), path)
        except BadFeature as e:
            raise SystemExit(f"error: {e}; {how}") from None
        if (tokens.shape[1], pooled.shape[0]) != (self.text_dim, self.pooled_dim):
            raise SystemExit(f"error: {path} is {tokens.shape[1]}- and {pooled.shape[0]}-wide, the features "
                             f"{self.text_dim} and {self.pooled_dim}: another encoder's; {how}")
        return tokens[None].float(), mask[None], pooled[None].float()
