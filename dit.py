"""The network of Pyramidal Flow Matching: an MM-DiT with blockwise-causal attention.

Implements Sec. 3.4 ("Practical implementation"), the model paragraph of App. B and Fig. 3b of
Jin et al., "Pyramidal Flow Matching for Efficient Video Generative Modeling" (ICLR 2025):
- the SD3-Medium MM-DiT block: a video stream (img_*) and a text stream (txt_*), each with its
  own adaLN-Zero, qkv, q/k RMSNorm, output projection and MLP, joined in one attention;
- full attention over the packed sequence [text | history frames | current frame] with a
  blockwise-causal mask, so every frame depends on earlier frames only (autoregression);
- positions (Fig. 3b): 2-D sin-cos spatial embedding that extrapolates across the spatial pyramid
  (each frame on its own unit token grid) and interpolates in the temporal pyramid (a low-res
  history frame sits on the block centres of the current grid), plus 1-D RoPE over the frame index.
(The captions' side, the toy text encoder and classifier-free guidance, is text_to_video.py; the
frozen pretrained encoders are text_encoders.py.)

Time is in paper notation: t = 0 noise, t = 1 data. History frames are modulated with the clean
time t = 1 (not the current t, as the release does): their activations then do not depend on the
step being denoised, which is what makes a KV cache possible (KVCache, MMDiT.make_cache: sampling
computes the text and history keys and values once per frame and stage). The release's modulation
(history_time = "current", no cache), time input, position table and q/k eps are options (convert.py).

Tensor legend: video [B, C, T, H, W]; one latent frame [B, C, h, w]; tokens [B, L, D];
per-head tensors [B, heads, S, head_dim]; S = L_text + N_video is the joint sequence length.
"""
import math
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

SINCOS_BASE = 10000.0  # base wavelength of sin-cos embeddings (Vaswani et al., 2017), as SD3/DiT


@dataclass
class DiTConfig:
    in_channels: int = 16          # latent channels of the VAE
    patch_size: int = 2            # p x p latent pixels per token
    width: int = 1536              # hidden size D of both streams
    depth: int = 24                # MM-DiT blocks
    heads: int = 24                # attention heads (head_dim = width / heads)
    mlp_ratio: float = 4.0
    text_dim: int = 4096           # width of the text tokens entering the text stream (T5-XXL)
    pooled_dim: int = 2048         # width of the pooled text vector (CLIP pooled)
    causal: bool = True            # False = bidirectional attention (Fig. 11 ablation)
    grad_checkpointing: bool = False  # recompute each block in backward: memory for compute
    manual_attention: bool = False    # reference masked softmax (O(S^2) memory): for tests
    per_frame_attention: bool = False  # causal attention as per-frame SDPA over the key prefix:
    #   same result, no S x S mask, 1.1-2.3x faster fwd+bwd on CPU (toy/bench_attention.py)
    rope_theta: float = 10000.0    # base of the 1-D RoPE over the frame index
    time_freq_dim: int = 256       # sinusoidal features of t before the time MLP (DiT)
    time_scale: float = 1000.0     # t in [0, 1] -> [0, 1000] so sin-cos frequencies resolve it
    norm_eps: float = 1e-6         # eps of LayerNorm / RMSNorm, as SD3
    # history (and, with history, text) modulated with the clean time t = 1 | "current": with the
    # current t, as the paper's release (its keys then change every step: no KV cache)
    history_time: str = "clean"
    # the authors' release (convert.py; RELEASE_LAYOUT: its values for patch 2; README "differences"):
    time_input: str = "t"      # "t": sin-cos of 1000 t | "release": of 1000 (1 - t) (1000 = noise), cos first
    # 0: sin-cos of each frame's positions (Fig. 3b) | N: the release's stored N x N table, [column | row]
    # halves, the current frame a centre crop of it and history frames that crop resized bilinearly
    pos_table: int = 0
    pos_spacing: float = 1.0   # position step between neighbouring tokens of the table (release: 64 / 192)
    qk_norm_eps: float = 1e-6  # eps of the q/k RMSNorm (release: 1e-5)


# sample_size 128 / patch 2 = 64 tokens a side in a 192-row table
RELEASE_LAYOUT = dict(time_input="release", pos_table=192, pos_spacing=64 / 192, qk_norm_eps=1e-5)


SIZES: dict[str, DiTConfig] = {
    # ~5.1M params (+0.15M toy text encoder); trains in minutes on a 2-core CPU (pixels or toy latents)
    "toy": DiTConfig(in_channels=3, patch_size=2, width=192, depth=4, heads=3,
                     text_dim=128, pooled_dim=128),
    # ~0.25B params; one GPU, the paper's text encoders
    "S": DiTConfig(width=768, depth=12, heads=12),
    # App. B: SD3 Medium, 24 layers, width 1536, 24 heads of 64, about 2.0B params
    "paper": DiTConfig(),
}


# ----------------------------------------------------------------------------- positions
def sincos_embed_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] float positions -> [N, dim] as [sin | cos] of geometric frequencies."""
    freqs = SINCOS_BASE ** -(torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim // 2))
    angles = pos.float()[:, None] * freqs[None]                        # [N, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_embed_2d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """[N, 2] (row, col) positions -> [N, dim]: half the channels encode the row, half the column."""
    return torch.cat([sincos_embed_1d(pos[:, 0], dim // 2), sincos_embed_1d(pos[:, 1], dim // 2)], -1)


def spatial_positions(h: int, w: int, h_cur: int, w_cur: int, device=None) -> torch.Tensor:
    """Token positions of an h x w token grid, in units of the current frame's h_cur x w_cur grid.

    The current frame (h = h_cur) gets 0, 1, ..., h-1: a frame always uses unit spacing, so going
    up a spatial stage extrapolates the embedding to new positions. A history frame r times smaller
    is interpolated onto the current grid: token i covers current tokens r*i .. r*i + r-1 and sits
    at their centre (i + 1/2) * r - 1/2, e.g. 2i + 0.5 at half resolution (Fig. 3b).
    """
    rows = (torch.arange(h, device=device) + 0.5) * (h_cur / h) - 0.5
    cols = (torch.arange(w, device=device) + 0.5) * (w_cur / w) - 0.5
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(h * w, 2)  # [h*w, 2]


def table_embedding(h: int, w: int, pos_grid, cfg: DiTConfig, device=None) -> torch.Tensor:
    """The release's spatial embedding of an h x w frame, [h*w, D]: the centre crop of its N x N table
    of the current grid's size, resized bilinearly to h x w when the frame is smaller (history)."""
    (H, W), N = pos_grid, cfg.pos_table
    if H > N or W > N:
        raise ValueError(f"a {H}x{W} token grid is larger than the {N}x{N} position table")
    rows, cols = ((torch.arange(n, device=device) + (N - n) // 2) * cfg.pos_spacing for n in (H, W))  # the crop
    col_row = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), -1).reshape(H * W, 2)  # [H*W, 2]
    crop = rearrange(sincos_embed_2d(col_row, cfg.width), "(h w) d -> 1 d h w", h=H)  # [1, D, H, W]
    if (h, w) != (H, W):
        crop = F.interpolate(crop, size=(h, w), mode="bilinear")
    return rearrange(crop, "1 d h w -> (h w) d")                                          # [h*w, D]


def rope_angles(frame_of_token: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """1-D RoPE over the frame index: [S] ints -> [S, head_dim/2] rotation angles."""
    freqs = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32, device=frame_of_token.device) / head_dim)
    return frame_of_token.float()[:, None] * freqs[None]


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x [B, H, S, head_dim] by angles [S, head_dim/2]."""
    pairs = rearrange(x.float(), "b h s (d two) -> b h s d two", two=2)  # [B, H, S, head_dim/2, 2]
    x1, x2 = pairs.unbind(-1)
    cos, sin = angles.cos(), angles.sin()
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
    return rearrange(rotated, "b h s d two -> b h s (d two)").type_as(x)  # [B, H, S, head_dim]


# ----------------------------------------------------------------------------- attention
def block_causal_mask(frame_of_token: torch.Tensor, key_valid: torch.Tensor, causal: bool = True,
                      query_frames: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask, True = may attend. frame_of_token [S], key_valid [B, S] -> [B, 1, S, S].

    Query q may see key k iff frame(q) >= frame(k) and k is not padding. Text tokens carry frame 0,
    so the text stream sees text and frame 0 only and never depends on later frames. Example:
    text "a b <pad>", history frame 0 with 2 tokens, current frame 1 with 2 tokens:

                      keys:  a  b  .  0  0  1  1
            query  a   (0)   x  x  .  x  x  .  .
            query  b   (0)   x  x  .  x  x  .  .
            query <pad>(0)   x  x  .  x  x  .  .     <- a padded query still has real keys:
            frame 0 token    x  x  .  x  x  .  .        no row is ever fully masked (no NaN)
            frame 0 token    x  x  .  x  x  .  .
            frame 1 token    x  x  .  x  x  x  x
            frame 1 token    x  x  .  x  x  x  x

    With causal=False (bidirectional, Fig. 11) only padding is masked: returns [B, 1, 1, S].
    query_frames [N]: the frames of queries that are only the last N tokens (the keys before them
    come from a KVCache): returns the last N rows, [B, 1, N, S].
    """
    pad = key_valid[:, None, None, :]                                              # [B, 1, 1, S]
    if not causal:
        return pad
    queries = frame_of_token if query_frames is None else query_frames
    return pad & (queries[:, None] >= frame_of_token[None, :])  # [B, 1, S or N, S]


@dataclass
class Packing:
    """Groups of sequences, each [b_g, L_g + N_g] with its own text length, frames and layout, packed
    into one [1, L_all] text stream and one [1, N_all] video stream, group by group, so that a
    training step with one group per stage makes one pass of the network (MMDiT.packed).
    Attention reads them in the joint order: every sequence's [text | video] in a row.
    groups: (b_g, S_g, mask, block_ends) each, the layout of one of its sequences (S_g = L_g + N_g);
    order [S_all]: the joint order as indices into [text stream | video stream], inverse its inverse;
    rope [S_all, head_dim/2]: the angles in the joint order; text: L_all."""
    groups: list
    order: torch.Tensor
    inverse: torch.Tensor
    rope: torch.Tensor
    text: int

    @staticmethod
    def make(sizes, layouts):
        """sizes (b_g, L_g, N_g) and layouts (rope, mask, block_ends) of the groups -> their Packing."""
        L_all, order, rope, t0, v0 = sum(b * L for b, L, _ in sizes), [], [], 0, 0
        device = layouts[0][0].device
        for (b, L, N), (group_rope, _, _) in zip(sizes, layouts):
            text = t0 + torch.arange(b * L, device=device).view(b, L)            # [b, L]
            video = L_all + v0 + torch.arange(b * N, device=device).view(b, N)   # [b, N]
            order.append(torch.cat([text, video], dim=1).flatten())
            rope.append(group_rope.repeat(b, 1))                                  # [b (L + N), head_dim/2]
            t0, v0 = t0 + b * L, v0 + b * N
        order = torch.cat(order)
        groups = [(b, L + N, mask, ends) for (b, L, N), (_, mask, ends) in zip(sizes, layouts)]
        return Packing(groups, order, torch.argsort(order), torch.cat(rope), L_all)


def attention(q, k, v, mask, manual: bool = False, block_ends: list[int] | None = None) -> torch.Tensor:
    """Masked attention of q, k, v [B, H, S, head_dim]; mask broadcastable to [B, H, S, S], True = keep.

    The only call of F.scaled_dot_product_attention. manual=True spells out softmax(q k^T / sqrt(d))
    with the mask: the reference the tests hold SDPA to (it materialises the S x S scores).
    block_ends (optional, exact alternative to the causal mask): the sequence is sorted by frame and
    split into query blocks ending at these indices; block [start, end) attends to keys [0, end),
    its own and all earlier frames. mask is then only the key padding [B, 1, 1, S]. The masked-out
    scores are never computed, and no S x S mask exists.
    """
    if block_ends is not None:
        starts = [0] + block_ends[:-1]
        return torch.cat([attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], mask[..., :e], manual)
                          for s, e in zip(starts, block_ends)], dim=2)  # [B, H, S, head_dim]
    if not manual:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])                   # [B, H, S, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def joint_attention(txt, img, rope, mask, manual=False, block_ends=None, cache=None, layer=0):
    """Attention over the joint sequence [text | video] from each stream's q, k, v (txt: 3 x
    [B, H, L, head_dim], img: 3 x [B, H, N, head_dim]) with RoPE (rope [S, head_dim/2]) -> the
    outputs of the text and of the video tokens, [B, L, D] and [B, N, D]. mask and block_ends as in
    attention(); cache: a KVCache being filled or attended to (block `layer`). mask may be a
    Packing (B = 1): each group's sequences then attend within themselves with their own layout,
    the block-diagonal mask of the packed sequence, its off-diagonal blocks never computed (rope is
    then unused: the Packing holds the angles in its joint order)."""
    if isinstance(mask, Packing):
        p = mask
        # [1, H, S_all, head_dim] each, in the joint order; RoPE once for all groups
        q, k, v = (torch.cat(pair, dim=2).index_select(2, p.order) for pair in zip(txt, img))
        q, k = apply_rope(q, p.rope), apply_rope(k, p.rope)
        outs, lengths = [], [b * S for b, S, _, _ in p.groups]
        for (b, _, group_mask, ends), *qkv in zip(p.groups, *(x.split(lengths, dim=2) for x in (q, k, v))):
            # 3 x [b, H, S_g, head_dim]: the group's sequences
            gq, gk, gv = (rearrange(x, "1 h (b s) d -> b h s d", b=b) for x in qkv)
            outs.append(rearrange(attention(gq, gk, gv, group_mask, manual, ends), "b h s d -> 1 (b s) (h d)"))
        out = torch.cat(outs, dim=1).index_select(1, p.inverse)  # [1, L_all + N_all, D]: the streams' order
        return out.split([p.text, out.shape[1] - p.text], dim=1)
    L = txt[0].shape[2]
    q, k, v = (torch.cat(pair, dim=2) for pair in zip(txt, img))              # [B, H, S, head_dim]
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    if cache is not None:
        k, v = cache.extend(layer, k, v)  # [B, H, P+S, head_dim]
    out = rearrange(attention(q, k, v, mask, manual, block_ends), "b h s d -> b s (h d)")  # [B, S, D]
    return out[:, :L], out[:, L:]


# ----------------------------------------------------------------------------- embedders
def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of t * time_scale -> MLP -> [B, D] (as DiT)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.freq_dim, self.scale, self.release = cfg.time_freq_dim, cfg.time_scale, cfg.time_input == "release"
        self.mlp = nn.Sequential(nn.Linear(cfg.time_freq_dim, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))

    def forward(self, t):
        # the release's clock runs the other way (1000 = noise) and puts cos first
        emb = sincos_embed_1d(((1 - t) if self.release else t) * self.scale, self.freq_dim)
        emb = emb.roll(self.freq_dim // 2, dims=-1) if self.release else emb
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Mlp(nn.Sequential):
    def __init__(self, width: int, hidden: int):
        super().__init__(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values (after RoPE) of the text and history tokens in every block, for sampling.

    Under the blockwise-causal mask neither text nor history tokens see the current frame, and
    history (and, once there is history, text) is modulated with the clean time, so within one
    stage of one frame their keys and values are the same at every Euler step. MMDiT.make_cache
    computes them once; each step then runs only the current frame's tokens, whose queries attend
    to [cached keys | own keys]. A cache holds for one batch, text and current-frame grid (history
    positions live on the current grid). Older frames never see newer ones, so a cache of the
    first frames can be extended by later ones (make_cache's base) without recomputing it.
    """

    def __init__(self, depth, pos_grid, base=None):
        # per block [B, heads, P, head_dim]
        self.keys = list(base.keys) if base else [None] * depth
        self.values = list(base.values) if base else [None] * depth
        self.key_valid = base.key_valid if base else None  # [B, P] bool, False = text padding
        self.frame_of_token = base.frame_of_token if base else None  # [P], text tokens in frame 0
        self.frames = base.frames if base else 0                     # history frames held
        self.y = base.y if base else None  # [B, D] the embedded pooled text
        self.pos_grid = pos_grid  # (rows, cols) of the token grid the positions refer to
        # make_cache's pass stores what it computes; the steps after it do not
        self.filling = True

    def extend(self, layer, k, v):
        """The keys and values block `layer` attends with: the cached ones followed by its own."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)  # [B, H, P+N, head_dim]
            v = torch.cat([self.values[layer], v], dim=2)
        if self.filling:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.keys + self.values)


# ----------------------------------------------------------------------------- the block
class MMDiTBlock(nn.Module):
    """SD3 joint block: per-stream adaLN-Zero, qkv, q/k RMSNorm; one joint attention; per-stream
    output projection and MLP. With last=True the text stream stops after attention (its output
    would never be read), so it has neither output projection nor MLP."""

    def __init__(self, cfg: DiTConfig, last: bool = False, layer: int = 0):
        super().__init__()
        D, head_dim, hidden = cfg.width, cfg.width // cfg.heads, int(cfg.width * cfg.mlp_ratio)
        # layer: this block's index (its KV cache entry)
        self.cfg, self.last, self.layer = cfg, last, layer
        norm = lambda: nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        # video stream: shift/scale/gate for attention and for the MLP
        self.img_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.img_norm1, self.img_qkv, self.img_proj = norm(), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.img_q_norm = nn.RMSNorm(head_dim, eps=cfg.qk_norm_eps)
        self.img_k_norm = nn.RMSNorm(head_dim, eps=cfg.qk_norm_eps)
        self.img_norm2, self.img_mlp = norm(), Mlp(D, hidden)
        # text stream: the same, or only shift/scale before attention in the last block
        self.txt_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, (2 if last else 6) * D))
        self.txt_norm1, self.txt_qkv = norm(), nn.Linear(D, 3 * D)
        self.txt_q_norm = nn.RMSNorm(head_dim, eps=cfg.qk_norm_eps)
        self.txt_k_norm = nn.RMSNorm(head_dim, eps=cfg.qk_norm_eps)
        if not last:
            self.txt_proj, self.txt_norm2, self.txt_mlp = nn.Linear(D, D), norm(), Mlp(D, hidden)

    def forward(self, img, txt, vec, img_rows, txt_rows, rope, mask, block_ends=None, cache=None):
        """img [B, N, D]; txt [B, L, D]; vec [B, V, D] conditioning vectors, of which img_rows [N] and
        txt_rows [L] (long) pick one per token; rope [S, head_dim/2]; mask and block_ends as in
        attention(); cache: a KVCache being filled or to attend to."""
        L, heads = txt.shape[1], self.cfg.heads
        # per-token modulation, e.g. history tokens read row 0 (clean time), noisy tokens row 1
        # 6 x [B, N, D]
        img_mods = self.img_adaLN_modulation(vec).index_select(1, img_rows).chunk(6, dim=-1)
        n_txt_mods = 2 if self.last else 6
        # [B, L, D] each; no text tokens (cached steps): skip the weights' read
        txt_mods = (self.txt_adaLN_modulation(vec).index_select(1, txt_rows).chunk(n_txt_mods, dim=-1) if L
                    else [txt] * n_txt_mods)
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mods
        txt_shift1, txt_scale1 = txt_mods[:2]

        # each stream: adaLN, its own qkv, head split, RMSNorm on q and k
        img_qkv = self.img_qkv(modulate(self.img_norm1(img), img_shift1, img_scale1))
        # 3 x [B, H, N, head_dim]
        iq, ik, iv = rearrange(img_qkv, "b n (three h d) -> three b h n d", three=3, h=heads)
        iq, ik = self.img_q_norm(iq), self.img_k_norm(ik)
        txt_qkv = self.txt_qkv(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))
        # 3 x [B, H, L, head_dim]
        tq, tk, tv = rearrange(txt_qkv, "b l (three h d) -> three b h l d", three=3, h=heads)
        tq, tk = self.txt_q_norm(tq), self.txt_k_norm(tk)

        # joint attention over [text | video], RoPE on the frame index: [B, L, D], [B, N, D]
        txt_attn, img_attn = joint_attention((tq, tk, tv), (iq, ik, iv), rope, mask, self.cfg.manual_attention,
                                             block_ends, cache, self.layer)

        img = img + img_gate1 * self.img_proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2))
        if self.last:
            return img, txt
        txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mods[2:]
        txt = txt + txt_gate1 * self.txt_proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))
        return img, txt


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear from tokens to patch pixels."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.width
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.linear = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_channels)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)   # 2 x [B, 1, D]
        return self.linear(modulate(self.norm(x), shift, scale))


# ----------------------------------------------------------------------------- the model
def check_config(cfg: DiTConfig):
    """ValueError unless the width splits into heads of even size (RoPE rotates pairs) and quarters
    (the 2-D sin-cos embedding); train.py checks a run's settings with it before any work."""
    if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 2 or cfg.width % 4:
        raise ValueError(f"width {cfg.width} must split into {cfg.heads} heads of even size and be divisible by 4")
    if cfg.history_time not in ("clean", "current") or cfg.time_input not in ("t", "release"):
        raise ValueError(f"history_time must be clean or current and time_input t or release, got "
                         f"{cfg.history_time!r} and {cfg.time_input!r}")


class MMDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.width
        # patchify is a rearrange + linear
        self.x_embedder = nn.Linear(cfg.in_channels * p * p, D)
        self.t_embedder = TimestepEmbedder(cfg)
        # pooled text
        self.y_embedder = nn.Sequential(nn.Linear(cfg.pooled_dim, D), nn.SiLU(), nn.Linear(D, D))
        # text tokens -> text stream
        self.context_embedder = nn.Linear(cfg.text_dim, D)
        self.blocks = nn.ModuleList(MMDiTBlock(cfg, last=(i == cfg.depth - 1), layer=i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self):
        # all linear layers: Xavier-uniform weights, zero biases (transformer default of DiT)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # the time and pooled-text MLPs: small normal weights, as DiT's embedders
        for mlp in (self.t_embedder.mlp, self.y_embedder):
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        # adaLN-Zero: zero shift/scale/gate, so every block starts as the identity
        for block in self.blocks:
            for mod in (block.img_adaLN_modulation, block.txt_adaLN_modulation):
                nn.init.zeros_(mod[-1].weight)
                nn.init.zeros_(mod[-1].bias)
        # final layer: zero, so the initial velocity is 0 and training starts from a neutral guess
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def check_frames(self, frames, all_frames):
        if not frames:
            raise ValueError("frames is empty: pass at least the current frame")
        B, (H, W) = frames[-1].shape[0], frames[-1].shape[-2:]
        for j, x in enumerate(frames):
            if x.dim() != 4 or x.shape[0] != B:
                raise ValueError(f"frame {j} has shape {tuple(x.shape)}, expected [{B}, C, h, w]")
            if x.shape[1] != self.cfg.in_channels:
                raise ValueError(f"frame {j} has {x.shape[1]} channels, the model expects {self.cfg.in_channels}")
            h, w = x.shape[-2:]
            if h % self.cfg.patch_size or w % self.cfg.patch_size:
                raise ValueError(f"frame {j} is {h}x{w}, not divisible by the patch size {self.cfg.patch_size}")
            if h > H or w > W:
                raise ValueError(f"history frame {j} is {h}x{w}, larger than the current frame {H}x{W}")
            if all_frames and (h, w) != (H, W):
                raise ValueError(f"all_frames needs equal frame sizes, frame {j} is {h}x{w} vs {H}x{W}")

    @property
    def cacheable(self) -> bool:
        """Whether the text and history keys stay fixed over a stage's steps (KVCache): not under
        bidirectional attention (they see the current frame), nor with history_time="current" (they follow t)."""
        return self.cfg.causal and self.cfg.history_time == "clean"

    def token_grid(self, size, grid=None):
        """(rows, cols) of the token grid positions refer to: the current frame's (size) or grid's."""
        p = self.cfg.patch_size
        return (size[0] // p, size[1] // p) if grid is None else (grid[0] // p, grid[1] // p)

    def embed(self, frames, pos_grid, first_frame=0):
        """Frames (oldest first, the first one being frame `first_frame`) -> video tokens [B, N, D]
        with 2-D positions on pos_grid, the frame index of each token [N], tokens per frame."""
        p, device = self.cfg.patch_size, frames[-1].device
        tokens, positions, frame_ids = [], [], []
        for j, x in enumerate(frames, start=first_frame):
            h, w = x.shape[-2] // p, x.shape[-1] // p
            # [B, h*w, C*p*p]
            tokens.append(rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p))
            positions.append(table_embedding(h, w, pos_grid, self.cfg, device) if self.cfg.pos_table else
                             sincos_embed_2d(spatial_positions(h, w, *pos_grid, device), self.cfg.width))
            frame_ids.append(torch.full((h * w,), j, device=device))
        img = self.x_embedder(torch.cat(tokens, 1))                            # [B, N, D]
        img = img + torch.cat(positions).to(img.dtype)
        return img, torch.cat(frame_ids), [x.shape[1] for x in tokens]

    def conditioning(self, pooled, t):
        """(vec, vec_history) [B, D]: time embedding + pooled text, at t and at the time history
        tokens take (clean data, t = 1, whatever t is; or t itself with history_time="current")."""
        y = self.y_embedder(pooled)                                            # [B, D]
        vec = self.t_embedder(t) + y
        if self.cfg.history_time == "current":
            return vec, vec
        return vec, self.t_embedder(torch.ones_like(t)) + y

    def layout(self, frame_ids, key_valid, tokens_per_frame, L):
        """Attention layout of [text | frames]: RoPE angles [S, head_dim/2], the mask, and the query
        blocks of per-frame attention (text joins frame 0's block)."""
        cfg = self.cfg
        # [S]
        frame_of_token = torch.cat([torch.zeros(L, dtype=frame_ids.dtype, device=frame_ids.device), frame_ids])
        # causality by slicing, not masking
        per_frame = cfg.causal and cfg.per_frame_attention
        mask = block_causal_mask(frame_of_token, key_valid, causal=cfg.causal and not per_frame)
        block_ends = [L + n for n in accumulate(tokens_per_frame)] if per_frame else None
        return rope_angles(frame_of_token, cfg.width // cfg.heads, cfg.rope_theta), mask, block_ends

    def run_blocks(self, img, txt, vec, img_rows, txt_rows, rope, mask, block_ends, cache=None):
        for block in self.blocks:
            args = (img, txt, vec, img_rows, txt_rows, rope, mask, block_ends, cache)
            if self.cfg.grad_checkpointing and self.training:
                img, txt = checkpoint(block, *args, use_reentrant=False)
            else:
                img, txt = block(*args)
        return img

    def forward(self, frames, text, text_mask, pooled, t, all_frames: bool = False, grid=None, cache=None):
        """frames: list of [B, C, h_j, w_j], oldest first, the last one the noisy current frame.
        text [B, L, text_dim], text_mask [B, L] bool (True = real token), pooled [B, pooled_dim],
        t [B] in [0, 1] (0 = noise). Returns the velocity [B, C, h, w] of the current frame, or with
        all_frames=True (full-sequence baseline, every frame noisy at t) [B, C, T, h, w].
        grid: the (rows, cols) of pixels that positions refer to; None = the current frame's own
        grid (the paper's extrapolation across stages). Passing the full-resolution size instead
        interpolates a low-stage current frame onto the full grid, as history frames are.
        cache: a KVCache of the text and history frames (make_cache); frames is then [current]
        alone and text, text_mask, pooled are not read (the cache holds what they give). Same
        result as passing them, at a fraction of the cost."""
        if cache is not None:
            self.check_frames(frames, all_frames)
            return self.cached_forward(frames, t, grid, cache)
        x = self.prepare(frames, text, text_mask, pooled, t, all_frames, grid)
        img = self.run_blocks(x["img"], x["txt"], x["vecs"], x["img_rows"], x["txt_rows"], *x["layout"])
        return self.velocity(img, x)

    def packed(self, groups):
        """forward (no cache) of several groups, dicts of its arguments, each with its own batch, text
        and frames, in one pass of the network: their tokens packed into one sequence (a Packing), so
        every per-token operation runs once on all of them. Returns the list of their outputs."""
        xs = [self.prepare(**g) for g in groups]
        D, sizes = self.cfg.width, [(*x["txt"].shape[:2], x["img"].shape[1]) for x in xs]  # (b, L, N) each
        # [1, L_all, D], [1, N_all, D] and [1, 2 B_all, D]: every group's text, video, conditioning
        txt, img, vecs = (torch.cat([x[key].reshape(1, -1, D) for x in xs], dim=1) for key in ("txt", "img", "vecs"))
        packing = Packing.make(sizes, [x["layout"] for x in xs])
        # a token's conditioning row: its group's first + 2 per earlier clip + its row in the clip's pair
        first = accumulate([0] + [2 * b for b, _, _ in sizes])
        clip_rows = [r + 2 * torch.arange(b, device=img.device)[:, None] for r, (b, _, _) in zip(first, sizes)]
        img_rows, txt_rows = (torch.cat([(r + x[key]).flatten() for r, x in zip(clip_rows, xs)])
                              for key in ("img_rows", "txt_rows"))                         # [N_all], [L_all]
        img = self.run_blocks(img, txt, vecs, img_rows, txt_rows, None, packing, None)
        ends = accumulate(b * N for b, _, N in sizes)
        return [self.velocity(img[0, e - b * N:e].view(b, N, D), x) for x, e, (b, _, N) in zip(xs, ends, sizes)]

    def prepare(self, frames, text, text_mask, pooled, t, all_frames=False, grid=None):
        """The inputs of the blocks for one call of forward: tokens, conditioning, layout()."""
        self.check_frames(frames, all_frames)
        T = len(frames)
        img, frame_ids, tokens_per_frame = self.embed(frames, self.token_grid(frames[-1].shape[-2:], grid))
        # conditioning: time embedding + pooled text. History is clean data (t = 1) whatever t is
        # (unless history_time="current"); text tokens belong to frame 0: frame 0's conditioning.
        vec, vec_history = self.conditioning(pooled, t)
        video_valid = torch.ones(text.shape[0], len(frame_ids), dtype=torch.bool, device=img.device)
        key_valid = torch.cat([text_mask.bool(), video_valid], dim=1)          # [B, S]
        return dict(img=img, txt=self.context_embedder(text),                 # [B, N, D], [B, L, D]
                    vecs=torch.stack([vec_history, vec], dim=1),               # [B, 2, D]
                    # [N], [L]: 1 = noisy (row 1 of vecs); the text takes frame 0's
                    img_rows=torch.ones_like(frame_ids) if all_frames else (frame_ids == T - 1).long(),
                    txt_rows=frame_ids.new_full(text.shape[1:2], int(T == 1 or all_frames)),
                    layout=self.layout(frame_ids, key_valid, tokens_per_frame, text.shape[1]),  # rope, mask, ends
                    vec=vec, all_frames=all_frames,
                    shape=(T, *(s // self.cfg.patch_size for s in frames[-1].shape[-2:])))

    def velocity(self, img, x):
        """Tokens [B, N, D] after the blocks -> the velocity of the current frame (or all frames)."""
        (T, H, W), p = x["shape"], self.cfg.patch_size
        # every frame is noisy
        if x["all_frames"]:
            out = self.final_layer(img, x["vec"])                              # [B, T*H*W, p*p*C]
            return rearrange(out, "b (t h w) (c p1 p2) -> b c t (h p1) (w p2)", t=T, h=H, w=W, p1=p, p2=p)
        out = self.final_layer(img[:, -H * W:], x["vec"])  # [B, H*W, p*p*C], current frame
        # [B, C, h, w]
        return rearrange(out, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=H, w=W, p1=p, p2=p)

    @torch.no_grad()
    def make_cache(self, history, text, text_mask, pooled, size, grid=None, base=None) -> KVCache:
        """The KVCache of the text and the history frames (oldest first) for forward(..., cache=)
        calls on current frames of size (h, w), with the same batch, text and grid: text + history
        through all blocks, as forward runs them for those tokens. base: a cache of the text and
        the first base.frames of these frames (same size and grid), which then runs only the later
        ones, their queries over [base | own] keys. It needs a `cacheable` model and at least one
        history frame: the first frame has no cache, as the text sees frame 0, then the current
        frame, and takes the current t."""
        if not self.cacheable:
            raise ValueError("no KV cache for this model: it needs causal attention and history_time='clean'")
        if not history:
            raise ValueError("no KV cache without history: the text sees frame 0, the current frame")
        B, device = history[-1].shape[0], history[-1].device
        self.check_frames(history + [history[-1].new_empty(B, self.cfg.in_channels, *size)], False)
        pos_grid = self.token_grid(size, grid)
        if base is not None and (base.pos_grid != pos_grid or base.frames > len(history)):
            raise ValueError("a base cache holds the first of these history frames, on the same grid")
        if base is not None and base.frames == len(history):
            return base
        cache = KVCache(self.cfg.depth, pos_grid, base)
        cache.y = self.y_embedder(pooled)                                      # [B, D]
        # all of it is clean data
        vec_clean = self.t_embedder(torch.ones(B, device=device)) + cache.y
        if base is not None:
            self.run_after(cache, history[base.frames:], vec_clean)
        else:  # text and history in one pass, as forward runs them
            L = text.shape[1]
            img, frame_ids, tokens_per_frame = self.embed(history, pos_grid)
            video_valid = torch.ones(B, len(frame_ids), dtype=torch.bool, device=device)
            key_valid = torch.cat([text_mask.bool(), video_valid], dim=1)      # [B, P]
            rope, mask, block_ends = self.layout(frame_ids, key_valid, tokens_per_frame, L)
            self.run_blocks(img, self.context_embedder(text), vec_clean[:, None], torch.zeros_like(frame_ids),
                            frame_ids.new_zeros(L), rope, mask, block_ends, cache)
            cache.key_valid, cache.frames = key_valid, len(history)
            cache.frame_of_token = torch.cat([torch.zeros(L, dtype=frame_ids.dtype, device=device), frame_ids])
        cache.filling = False
        return cache

    def run_after(self, cache, frames, vec):
        """Tokens [B, N, D] of frames that follow the cache's, after all blocks, modulated with vec,
        their queries over [cached | own] keys (causal among them); a filling cache keeps them too."""
        # [B, N, D]
        img, frame_ids, _ = self.embed(frames, cache.pos_grid, first_frame=cache.frames)
        B, N, D = img.shape
        key_valid = torch.cat([cache.key_valid, torch.ones(B, N, dtype=torch.bool, device=img.device)], 1)
        key_frames = torch.cat([cache.frame_of_token, frame_ids])                      # [P+N]
        mask = block_causal_mask(key_frames, key_valid, query_frames=frame_ids)  # [B, 1, N, P+N]
        # [N, head_dim/2]
        rope = rope_angles(frame_ids, self.cfg.width // self.cfg.heads, self.cfg.rope_theta)
        if cache.filling:
            cache.key_valid, cache.frame_of_token, cache.frames = key_valid, key_frames, cache.frames + len(frames)
        # the text is in the cache
        txt = img.new_zeros(B, 0, D)
        rows = torch.zeros_like(frame_ids)                                     # [N]: vec
        return self.run_blocks(img, txt, vec[:, None], rows, rows[:0], rope, mask, None, cache)

    def cached_forward(self, frames, t, grid, cache):
        """forward for the current frame alone, its queries over [cached text and history | own] keys."""
        x, p = frames[-1], self.cfg.patch_size
        B, H, W = x.shape[0], x.shape[-2] // p, x.shape[-1] // p
        if len(frames) != 1 or B != len(cache.key_valid) or self.token_grid(x.shape[-2:], grid) != cache.pos_grid:
            raise ValueError("a cached call takes [current frame] alone, of the batch and grid of its cache")
        vec = self.t_embedder(t) + cache.y                                     # [B, D]
        return self.velocity(self.run_after(cache, [x], vec), dict(shape=(1, H, W), all_frames=False, vec=vec))
