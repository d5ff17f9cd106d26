"""
LoRA (Hu et al., 2021, "Low-Rank Adaptation"): fine-tune a trained MM-DiT on your own clips through
small adapters, its own weights frozen. Not in the paper; the authors' release has no fine-tuning path.

A frozen Linear y = W x + b (W: out x in) gets a trainable low-rank update,

    y = W x + b + (alpha / r) B A x,        A: r x in (random), B: out x r (zero), r << in,

so at step 0 the model is exactly the base, only A and B get gradients and AdamW states, and an
adapter is (in + out) r numbers per layer instead of in x out. Merging, W' = W + w (alpha / r) B A,
gives a plain network that computes the same (w = 1) or a weaker / blended one (w < 1, several).

    python train.py --init_from=out/tiny/ckpt.pt --lora_rank=8 --out_dir=out/my_lora ...
    python sample.py --ckpt=out/tiny/ckpt.pt --lora=out/my_lora/ckpt.pt:0.7 --prompt=... --out=a.gif
    python sample.py --ckpt=out/tiny/ckpt.pt --lora=out/my_lora/ckpt.pt --merge=out/merged.pt

The first half of this file is LoRA itself; the second is its files: an adapter checkpoint is
train.py's checkpoint with only the adapters' weights and `lora`, the base's path and the sha256
of its weights (names, dtypes, shapes and bytes: a base moved or re-saved still matches, any
changed weight does not), and is refused in one line against another base.
Tensor legend: tokens [B, L, D].
"""
import copy
import hashlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import text_to_video
from common import fail, is_master, read_checkpoint, save_torch

# attention projections (q, k, v and output) and MLPs of both streams of every MM-DiT block
DEFAULT_MODULES = "qkv,proj,mlp"


class LoRALinear(nn.Linear):
    """A Linear with a low-rank update; its own weight and bias keep their names (and their values)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias           # shared with the base, frozen
        self.scale = alpha / rank
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))   # [r, in]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))     # as nn.Linear initialises a weight
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # [out, r]: starts as the base

    def forward(self, x):
        # x [..., in] -> A: [..., r] -> B: [..., out], added to the frozen W x + b, scaled by alpha / r
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_lora(net: nn.Module, rank: int, alpha: float = 0.0, modules: str = DEFAULT_MODULES) -> int:
    """Wrap the Linear layers of the MM-DiT blocks of net (a TextToVideo) whose names contain one of
    `modules` (comma-separated parts, e.g. "qkv,proj,mlp"; "adaLN" adds the modulation) in
    LoRALinear, and freeze everything else of net. alpha 0: alpha = rank. Returns how many layers
    got adapters."""
    parts = [m.strip() for m in modules.split(",") if m.strip()]
    chosen = [(name, m) for name, m in net.dit.blocks.named_modules()
              if type(m) is nn.Linear and any(p in name for p in parts)]
    net.requires_grad_(False)
    for name, linear in chosen:
        parent, _, child = name.rpartition(".")
        setattr(net.dit.blocks.get_submodule(parent), child, LoRALinear(linear, rank, alpha or rank))
    return len(chosen)


@torch.no_grad()
def merge_lora(net: nn.Module, weight: float = 1.0) -> None:
    """W += weight * (alpha / r) B A in every LoRALinear of net, which becomes a plain Linear again."""
    for name, m in list(net.named_modules()):
        if isinstance(m, LoRALinear):
            m.weight += weight * m.scale * (m.lora_B.float() @ m.lora_A.float()).to(m.weight.dtype)
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, plain)


# ----------------------------------------------------------------------------- adapter files
def weights_sha256(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def own_state(net: nn.Module) -> dict:
    """A TextToVideo's own weights: a frozen pretrained text encoder set by sample.py for a features
    checkpoint is not part of them (the checkpoint's network is built without it)."""
    own = isinstance(net.text_encoder, text_to_video.ToyTextEncoder)
    return {k: v for k, v in net.state_dict().items() if own or not k.startswith("text_encoder.")}


def base_sha256(net: nn.Module) -> str:
    """weights_sha256 of a TextToVideo's own weights (own_state)."""
    return weights_sha256(own_state(net))


def adapters(state: dict) -> dict:
    """The adapters' entries of a state dict (the frozen base is not saved)."""
    return {k: v for k, v in state.items() if ".lora_" in k}


def adapter_checkpoint(weights: dict, record: dict) -> dict:
    """What an adapter checkpoint holds beside train.py's usual entries: the adapters of the model and
    its EMA (their AdamW states are all the optimizer has), the base's record, and no VAE (the base's)."""
    return dict(weights, model=adapters(weights["model"]), ema=adapters(weights["ema"]), lora=record, vae=None)


def load_adapters(module: nn.Module, state: dict, path: str) -> None:
    """Adapter weights into a module that has exactly these adapters; one line otherwise."""
    missing = set(adapters(module.state_dict())) ^ set(state or {})
    if missing:
        fail(f"{path} holds other adapters than this model's ({len(missing)} differ, e.g. {sorted(missing)[0]}): "
             f"its --lora_rank/--lora_modules or network differ")
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        fail(f"{path} does not fit this model's adapters ({str(e).strip().splitlines()[-1].strip()[:200]})")


def check_base(record: dict, sha256: str, base: str, path: str) -> None:
    """Refuse, in one line, an adapter trained on another base than the weights at `base`."""
    if record.get("base_sha256") != sha256:
        fail(f"{path} adapts the base {record.get('base')} (weights sha256 {str(record.get('base_sha256'))[:12]}), "
             f"not {base} (sha256 {sha256[:12]}): give the base it was trained on")


def start_training(model: nn.Module, cfg, ckpt_path: str):
    """train.py with --lora_rank: model (a VideoLoss holding the base's weights) gets adapters and
    a frozen base; its EMA shares the base's tensors (the EMA is of the adapters alone). Resuming,
    the run's checkpoint at ckpt_path must be of the same base and gives the adapters back.
    Returns (ema, record): record is what the checkpoint keeps of the base."""
    resumed = read_checkpoint(ckpt_path, "pyramid-flow", "checkpoint", mmap=True) if cfg.resume else None
    record = dict(base=cfg.init_from, base_sha256=base_sha256(model.net),
                  rank=cfg.lora_rank, alpha=cfg.lora_alpha or cfg.lora_rank, modules=cfg.lora_modules)
    if resumed is not None:
        check_base(resumed.get("lora") or {}, record["base_sha256"], cfg.init_from, "the run's checkpoint")
    n_base = sum(p.numel() for p in model.parameters())
    n = add_lora(model.net, cfg.lora_rank, cfg.lora_alpha, cfg.lora_modules)
    if n == 0:
        fail(f"--lora_modules={cfg.lora_modules} names no Linear layer of the MM-DiT (e.g. qkv,proj,mlp,adaLN)")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if is_master():
        print(f"LoRA: rank {cfg.lora_rank} adapters on {n} layers, {trained:,} trained parameters "
              f"({100 * trained / n_base:.1f}% of the base's {n_base:,}, frozen: {cfg.init_from})")
    frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
    ema = copy.deepcopy(model, memo=frozen).requires_grad_(False)  # the base's tensors shared
    if resumed is not None:
        load_adapters(model, resumed.get("model"), "the run's checkpoint")
        load_adapters(ema, resumed.get("ema"), "the run's checkpoint")
    return ema, record


def apply_files(net: nn.Module, spec: str, base: str) -> list:
    """sample.py --lora=PATH[:W][,PATH[:W]...]: each adapter (its EMA weights), checked against the
    base `base` whose weights net holds, merged into net with weight W (default 1). Returns
    [(path, W), ...]."""
    sha256 = base_sha256(net)
    applied = []
    for item in spec.split(","):
        path, _, w = item.rpartition(":")
        try:
            w = float(w)
        except ValueError:  # no weight given (or a colon in the path)
            path, w = item, 1.0
        if not path or not math.isfinite(w):
            fail(f"--lora takes PATH or PATH:WEIGHT, comma-separated; got {item!r}")
        ck = read_checkpoint(path, "pyramid-flow", "adapter checkpoint", " (train one with --lora_rank)", mmap=True)
        record = ck.get("lora")
        if not record:
            fail(f"--lora={path} is a checkpoint without adapters (trained without --lora_rank)")
        check_base(record, sha256, base, path)
        add_lora(net, record["rank"], record["alpha"], record["modules"])
        load_adapters(net, {k[len("net."):]: v for k, v in ck["ema"].items()}, path)
        merge_lora(net, w)
        applied.append((path, w))
    net.requires_grad_(False)
    return applied


def write_merged(out: str, base: str, net: nn.Module, applied: list) -> None:
    """sample.py --merge=OUT: the base checkpoint with the merged weights as its model and EMA (no
    optimizer state), a plain checkpoint sample.py and --init_from take; `merged` names the adapters."""
    ck = read_checkpoint(base, "pyramid-flow", "video checkpoint", mmap=True)
    state = {f"net.{k}": v.detach().cpu() for k, v in own_state(net).items()}
    keep = {k: v for k, v in ck.items() if k not in ("model", "ema", "optimizer", "lora")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_torch(out, dict(keep, model=state, ema=state, merged=dict(base=base, adapters=applied)))
