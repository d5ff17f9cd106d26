"""
Run plumbing that train.py, sample.py, video_data.py and convert.py share, and that none of them
is about (as nanochat's common.py): one-line errors, the one atomic writer, the one checkpoint
reader, reading and writing images and videos, the command line's small parsers, distributed
set-up, the one mixed-precision context, FSDP2 state, interrupts and the run lock.
Nothing here knows the method or the networks; it imports nothing of ours.

Tensor legend: video [B, 3, F, H, W] or one video [3, F, H, W], pixels in [-1, 1].
"""
import contextlib
import fcntl
import json
import math
import os
import signal
import threading

import numpy as np
import torch

FPS = 8  # playback rate of written videos (a run on real videos plays at its own --fps)
SEED_STRIDE = 1_000_003  # a prime: seed * SEED_STRIDE + n keeps the (seed, rank, step, ...) seeds apart


# -----------------------------------------------------------------------------
# Errors, files, checkpoints

def fail(msg):
    """End the run with one line, no traceback."""
    raise SystemExit(f"error: {msg}")


class DataError(Exception):
    """A data file found bad in the middle of a run (video_data.BadFeature): the loop writes the
    last good step's checkpoint and stops with the message's last line."""


def first_line(error):
    """The first line of an exception's message (or its type's name)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def atomic_write(path, write, rank=None):
    """`write(tmp)` writes the file to a temporary name beside `path`, which is then renamed over
    `path`: an interrupted or failed write never leaves a partial file under `path`, and a failed
    one (disk full) removes its temporary file and ends the run with one line. `rank`: ranks that
    may write the same file (a caption two shards share) never share a temporary one."""
    ext = os.path.splitext(path)[1]  # the same extension: writers pick the format from it
    tag = "" if rank is None else f".rank{rank}"
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}{tag}.tmp{ext}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        fail(f"could not write {path} ({getattr(e, 'strerror', None) or first_line(e)}); "
             f"whatever was there before is unchanged")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(path, obj, rank=None):
    atomic_write(path, lambda tmp: torch.save(obj, tmp), rank)


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def save_text(path, text, rank=None):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write, rank)


def read_checkpoint(path, kind, what, hint="", mmap=False, sharded=False):
    """The dict saved at `path` (tensors on the CPU; memory-mapped with mmap=True, read as they
    load), checked to be of `kind`; a missing, truncated or foreign file gets one line, not a
    traceback. Never unpickles code (weights_only). The index of a sharded checkpoint (checkpoint.py)
    is refused unless sharded=True (its reader loads the shards)."""
    if not os.path.isfile(path):
        fail(f"no {what} at {path}{hint}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}: truncated, or not written by torch.save)")
    if not isinstance(ck, dict) or ck.get("kind") != kind:
        fail(f"{path} is not a {what} of this repository{hint}")
    if ck.get("sharded") and not sharded:
        fail(f"{path} is the index of a sharded checkpoint ({ck['sharded']}); write one file with "
             f"python checkpoint.py {path}")
    return ck


def build(path, what, make):
    """make() (a module from a checkpoint's config), with one line for a damaged checkpoint."""
    try:
        return make()
    except (KeyError, TypeError, ValueError) as e:
        fail(f"{path} is a damaged {what} ({type(e).__name__}: {e})")


def load_weights(module, state, path, load=None):
    """module.load_state_dict(state) (or `load(state)`, e.g. into a sharded module), with a one-line
    error for a checkpoint of another shape."""
    try:
        (load or module.load_state_dict)(state)
    except (RuntimeError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[-1].strip()
        fail(f"{path} does not fit this model ({type(module).__name__}: {reason[:200]})")


def load_vae(path):
    """A frozen VAE from a VAE checkpoint (out/vae-toy/vae.pt, the shipped one, a converted one)."""
    import vae  # the ground floor; imported here so that plumbing stays below it
    ck = read_checkpoint(path, "causal-vae", "VAE checkpoint", "; train one with python train.py --preset=vae-toy")
    model = build(path, "VAE checkpoint", lambda: vae.CausalVAE(vae.VAEConfig(**ck["config"])))
    load_weights(model, ck.get("model"), path)
    # what it was trained on (train.py refuses other toy data)
    model.recipe = ck.get("recipe") or {}
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# Images and videos

def to_uint8(video):
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    return ((video.permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def write_video(path, video, fps=FPS):
    """One video [3, F, H, W] to .gif or .mp4, atomically. A gif stores identical consecutive
    frames as one longer frame (Pillow): same playback, fewer frames read back. mp4 keeps small
    frames unresized (macro_block_size=1); gif is the faithful format for tiny saturated frames."""
    import imageio.v2 as imageio
    ext = os.path.splitext(path)[1].lower()
    frames = list(to_uint8(video))
    if ext == ".gif":
        atomic_write(path, lambda tmp: imageio.mimwrite(tmp, frames, duration=1000 / fps, loop=0))
    elif ext == ".mp4":
        atomic_write(path, lambda tmp: imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1, quality=9))
    else:
        fail(f"unknown video format {ext!r} for {path}; use .gif or .mp4")


def tile(videos, cols):
    """[B, 3, F, H, W] -> one [3, F, rows*H, cols*W] grid video (black where the grid is short)."""
    B, C, F, H, W = videos.shape
    rows = -(-B // cols)
    grid = videos.new_full((rows * cols, C, F, H, W), -1.0)
    grid[:B] = videos
    # [C, F, rows, H, cols, W]
    grid = grid.reshape(rows, cols, C, F, H, W).permute(2, 3, 0, 4, 1, 5)
    return grid.reshape(C, F, rows * H, cols * W)


def to_rgb(img):
    """A PIL image of any mode -> 8-bit RGB as a viewer shows it: its EXIF orientation applied,
    16-bit grey scaled down (not clipped at 255, which turns it white), transparency composited
    on black, the background of the training data. Extraction (video_data) and sampling share it."""
    from PIL import Image, ImageOps
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey (PNG opens as I;16 or I)
        grey = np.asarray(img, dtype=np.float64) * (255 / 65535)
        img = Image.fromarray(grey.clip(0, 255).round().astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, img)
    return img.convert("RGB")


def rgb_array(frame):
    """A decoded frame (uint8 or uint16; [H, W], [H, W, 1], grey + alpha, RGB or RGBA) -> uint8
    [H, W, 3] as to_rgb converts an image."""
    from PIL import Image
    frame = np.asarray(frame)
    if frame.dtype == np.uint16:
        frame = (frame.astype(np.float64) * (255 / 65535)).round().astype(np.uint8)
    if frame.ndim == 3 and frame.shape[-1] == 1:
        frame = frame[..., 0]
    return np.asarray(to_rgb(Image.fromarray(frame.astype(np.uint8))))


def read_image(path, size):
    """[1, 3, 1, H, W] in [-1, 1]; size: the model's frame side, or (height, width)."""
    from PIL import Image
    height, width = size if isinstance(size, tuple) else (size, size)
    try:
        with Image.open(path) as f:
            img = to_rgb(f)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        fail(f"cannot read image {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if img.size != (width, height):
        print(f"note: resizing {path} from {img.size[0]}x{img.size[1]} to {width}x{height}, the model's frame size")
        img = img.resize((width, height), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32))                 # [H, W, 3]
    return (x.permute(2, 0, 1)[None, :, None] / 127.5 - 1)                  # [1, 3, 1, H, W]


def read_video(path, size):
    """A clip [1, 3, F, H, W] in [-1, 1] from a gif or mp4, each frame made 8-bit RGB as to_rgb
    makes an image (the same as extraction: grey and 16-bit scaled, transparency on black).
    size: the model's frame side, or (height, width)."""
    import imageio.v2 as imageio
    height, width = size if isinstance(size, tuple) else (size, size)
    try:
        frames = [np.asarray(f) for f in imageio.mimread(path)]
    except Exception as e:  # noqa: BLE001 - imageio raises many kinds for unreadable files
        fail(f"cannot read video {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not frames or len({f.shape for f in frames}) != 1:
        fail(f"cannot read video {path} (no frames, or frames of different sizes)")
    x = torch.from_numpy(np.stack([rgb_array(f) for f in frames]).astype(np.float32))  # [F, H, W, 3]
    if x.shape[1:3] != (height, width):
        fail(f"video {path} is {x.shape[2]}x{x.shape[1]}, the model makes {width}x{height} frames")
    return x.permute(3, 0, 1, 2)[None] / 127.5 - 1                          # [1, 3, F, H, W]


# -----------------------------------------------------------------------------
# The command line: --key=value

def key_values(argv, usage):
    """[(key, value)] from --key=value and --key value alike, dashes in keys read as underscores.
    A value may not start with -- (a forgotten one)."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            fail(f"unexpected argument {arg!r}; use --key=value ({usage})")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # --key value
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                fail(f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
            value, i = argv[i + 1], i + 1
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def wants_help(argv):
    return "-h" in argv or "--help" in argv


def boolean(key, value):
    """true/false, yes/no, on/off, 1/0 (any case); anything else is refused, never read as true."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    fail(f"--{key} expects true or false, got {value!r}")


def number(key, text, typ):
    """--key's text as an int or a finite float, else one line."""
    try:
        value = typ(text)
    except ValueError:
        fail(f"--{key} expects {typ.__name__}, got {text!r}")
    if typ is float and not math.isfinite(value):
        fail(f"--{key} must be a finite number, got {text!r}")
    return value


def int_list(key, text, n=None):
    """A list setting as written on the command line (steps per stage, the stage ratio: lowest
    resolution first): positive integers separated by commas, n of them if n is given."""
    vals = [v.strip() for v in text.split(",")] if text else []
    if (n is not None and len(vals) != n) or not vals or not all(v.isdigit() and int(v) > 0 for v in vals):
        fail(f"--{key} needs {'' if n is None else f'{n} '}positive integers separated by commas "
             f"(lowest resolution first), got {text!r}")
    return [int(v) for v in vals]


def check_device(key, name):
    """A device that exists on this machine (cpu, cuda, cuda:N, mps), else one line saying why not."""
    kind, colon, index = name.partition(":")
    if kind == "cuda" and (not colon or index.isdigit()):
        if not torch.cuda.is_available():
            fail(f"--{key}={name}: torch sees no CUDA device on this machine")
        if colon and int(index) >= torch.cuda.device_count():
            fail(f"--{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif name == "mps":
        if not torch.backends.mps.is_available():
            fail(f"--{key}=mps: torch sees no Apple GPU (mps) on this machine")
    elif name != "cpu":
        fail(f"--{key}={name!r} is not a device; use cpu, cuda, cuda:N or mps")


def check_writable_dir(key, path):
    """`path` is, or can be made, a folder this process may write in: its nearest existing
    ancestor is a writable folder, not a file."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        fail(f"--{key}={path} cannot be a folder: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(f"--{key}={path}: cannot write in {probe} (permission denied)")


# -----------------------------------------------------------------------------
# Devices, processes, precision

def setup_distributed(device="auto"):
    """(ddp, rank, world, device): DDP when launched by torchrun (RANK in the environment), else a
    single process. A torchrun job on CUDA takes its local GPU and NCCL, on the CPU gloo."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not ddp:
        return False, 0, 1, torch.device(device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():  # once per process, even when a run trains twice
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True, rank, world, torch.device(device)


def is_master():
    """Rank 0 of a torchrun job, or a single process (before or after set-up)."""
    return os.environ.get("RANK", "0") == "0"


def autocast(device):
    """Mixed precision is one context: bf16 autocast on CUDA, nothing elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -----------------------------------------------------------------------------
# FSDP2 state: full (unsharded) tensors in and out of sharded modules

def shard(modules, block_type, bf16=False):
    """FSDP2 (torch's fully_shard): every `block_type` block, then the whole module, keeps
    1/world of its weights, gradients and AdamW states; a block's weights are gathered only while
    it runs. Used on the model and its EMA alike, so the EMA update stays a per-shard lerp.
    bf16: gather the weights in bf16 for compute and reduce the gradients in fp32 (the shards and
    AdamW stay fp32); the CPU keeps fp32 throughout, as autocast does."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for module in modules:
        for block in module.modules():
            if isinstance(block, block_type):
                fully_shard(block, mp_policy=policy)
        fully_shard(module, mp_policy=policy)


def build_sharded(make, device, block_type):
    """(model, EMA) of make() under FSDP2, materialised only as shards: every rank builds them on
    the meta device and shards them; rank 0 alone builds the initial weights (on the CPU, from the
    seed set before) and sends each rank its part. Mixed precision on CUDA (shard)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    full = make().state_dict() if is_master() else {}
    with torch.device("meta"):
        model, ema = make(), make().requires_grad_(False)
    shard((model, ema), block_type, bf16=torch.device(device).type == "cuda")
    for module in (model, ema):
        module.to_empty(device=device)
        set_model_state_dict(module, dict(full), options=_full_state_options(broadcast_from_rank0=True))
    return model, ema


def any_rank(flag, device):
    """True on every rank when `flag` is true on any (a collective under torchrun), so all agree."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t)
    return t.item() > 0


def _full_state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def module_state(module, fsdp):
    """A module's state dict; under FSDP its full tensors gathered to rank 0's CPU (a collective:
    every rank calls it; the others get an empty dict), so a sharded run's checkpoint loads unsharded."""
    if not fsdp:
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(module, options=_full_state_options(cpu_offload=True))


def optimizer_state(model, opt, fsdp):
    if not fsdp:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=_full_state_options(cpu_offload=True))


def load_module(module, state, fsdp, path):
    """Full (unsharded) weights into a module, sharded or not; weights of another shape get one line."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    load = (lambda s: set_model_state_dict(module, s, options=_full_state_options())) if fsdp else None
    load_weights(module, state, path, load)


def load_optimizer(model, opt, state, fsdp, path):
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    load = (lambda s: set_optimizer_state_dict(model, opt, s, options=_full_state_options())) if fsdp else None
    load_weights(opt, state, path, load)


# -----------------------------------------------------------------------------
# Runs you can stop, one at a time in a folder

class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption) while listening only set a flag: the
    loop finishes the step in flight, writes a checkpoint and exits, so the checkpoint is consistent
    and at most one step is lost. A second signal acts at once, as it would without this."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

    def listen(self):
        # Python runs handlers in the main thread only; an ignored signal (nohup, &) stays ignored
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS
                             if signal.getsignal(s) is not signal.SIG_IGN}

    def handle(self, signum, frame):
        first, self.signum = self.signum is None, signum
        # torchrun forwards a signal to workers that may have had it already: a
        if "RANK" in os.environ:
            # repeat must not cost the checkpoint (torchrun kills them 30 s later)
            again = ""
        else:
            signal.signal(signum, self.previous[signum] or signal.SIG_DFL)
            again = " (again: stop at once, without one)"
        if first:  # not print: a handler may interrupt one
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint{again}\n".encode())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler or signal.SIG_DFL)
        self.previous = {}

    def message(self, step, ckpt_path):
        name = signal.Signals(self.signum).name if self.signum else "a signal to another process"
        return (f"interrupted by {name} after step {step}: wrote {ckpt_path}; "
                f"continue with the same command and --resume=true")


@contextlib.contextmanager
def out_dir_lock(out_dir, what="run", name="lock", every_rank=False):
    """One run at a time in a folder: an exclusive flock on out_dir/`name` for the run, which the
    kernel releases when the process ends, however it ends (no stale lock to clean up).
    every_rank: each rank locks its own `name` (extraction: rank r's lock.rank<r>)."""
    if not every_rank and not is_master():  # torchrun: rank 0 holds it for the job
        yield
        return
    path = os.path.join(out_dir, name)
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        fail(f"cannot write in --out_dir={out_dir} ({e.strerror})")
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            fail(f"another {what} (process {f.read().strip() or '?'}) is writing to {out_dir}; wait for it "
                 f"to end or pick another --out_dir")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
