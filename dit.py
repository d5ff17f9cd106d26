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
- a download-free toy text encoder with the interface that T5 tokens + CLIP pooled fill later.

Time is in paper notation: t = 0 noise, t = 1 data. History frames are modulated with the clean
time t = 1 (not the current t, as the release does): their activations then do not depend on the
step being denoised, which is what makes a KV cache possible.

Tensor legend: video [B, C, T, H, W]; one latent frame [B, C, h, w]; tokens [B, L, D];
per-head tensors [B, heads, S, head_dim]; S = L_text + N_video is the joint sequence length.
"""
import math
import re
import zlib
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
def block_causal_mask(frame_of_token: torch.Tensor, key_valid: torch.Tensor, causal: bool = True) -> torch.Tensor:
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
    """
    pad = key_valid[:, None, None, :]                                              # [B, 1, 1, S]
    if not causal:
        return pad
    return pad & (frame_of_token[:, None] >= frame_of_token[None, :])             # [B, 1, S, S]


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
                          for s, e in zip(starts, block_ends)], dim=2)            # [B, H, S, head_dim]
    if not manual:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])                   # [B, H, S, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


# ----------------------------------------------------------------------------- embedders
def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of t * time_scale -> MLP -> [B, D] (as DiT)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.freq_dim, self.scale = cfg.time_freq_dim, cfg.time_scale
        self.mlp = nn.Sequential(nn.Linear(cfg.time_freq_dim, cfg.width), nn.SiLU(), nn.Linear(cfg.width, cfg.width))

    def forward(self, t):
        return self.mlp(sincos_embed_1d(t * self.scale, self.freq_dim).to(self.mlp[0].weight.dtype))


class Mlp(nn.Sequential):
    def __init__(self, width: int, hidden: int):
        super().__init__(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


# ----------------------------------------------------------------------------- the block
class MMDiTBlock(nn.Module):
    """SD3 joint block: per-stream adaLN-Zero, qkv, q/k RMSNorm; one joint attention; per-stream
    output projection and MLP. With last=True the text stream stops after attention (its output
    would never be read), so it has neither output projection nor MLP."""

    def __init__(self, cfg: DiTConfig, last: bool = False):
        super().__init__()
        D, head_dim, hidden = cfg.width, cfg.width // cfg.heads, int(cfg.width * cfg.mlp_ratio)
        self.cfg, self.last = cfg, last
        norm = lambda: nn.LayerNorm(D, elementwise_affine=False, eps=cfg.norm_eps)
        # video stream: shift/scale/gate for attention and for the MLP
        self.img_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.img_norm1, self.img_qkv, self.img_proj = norm(), nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.img_q_norm = nn.RMSNorm(head_dim, eps=cfg.norm_eps)
        self.img_k_norm = nn.RMSNorm(head_dim, eps=cfg.norm_eps)
        self.img_norm2, self.img_mlp = norm(), Mlp(D, hidden)
        # text stream: the same, or only shift/scale before attention in the last block
        self.txt_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, (2 if last else 6) * D))
        self.txt_norm1, self.txt_qkv = norm(), nn.Linear(D, 3 * D)
        self.txt_q_norm = nn.RMSNorm(head_dim, eps=cfg.norm_eps)
        self.txt_k_norm = nn.RMSNorm(head_dim, eps=cfg.norm_eps)
        if not last:
            self.txt_proj, self.txt_norm2, self.txt_mlp = nn.Linear(D, D), norm(), Mlp(D, hidden)

    def forward(self, img, txt, img_vec, img_is_noisy, txt_vec, rope, mask, block_ends=None):
        """img [B, N, D]; txt [B, L, D]; img_vec [B, 2, D] conditioning of (history, noisy) tokens;
        img_is_noisy [N] long picks a row of img_vec per token; txt_vec [B, D]; rope [S, head_dim/2];
        mask and block_ends as in attention()."""
        L, heads = txt.shape[1], self.cfg.heads
        # per-token modulation: history tokens read row 0 (clean time), noisy tokens row 1
        img_mods = self.img_adaLN_modulation(img_vec)[:, img_is_noisy].chunk(6, dim=-1)    # 6 x [B, N, D]
        txt_mods = self.txt_adaLN_modulation(txt_vec)[:, None].chunk(2 if self.last else 6, dim=-1)  # [B, 1, D] each
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_mods
        txt_shift1, txt_scale1 = txt_mods[:2]

        # each stream: adaLN, its own qkv, head split, RMSNorm on q and k
        img_qkv = self.img_qkv(modulate(self.img_norm1(img), img_shift1, img_scale1))
        iq, ik, iv = rearrange(img_qkv, "b n (three h d) -> three b h n d", three=3, h=heads)  # 3 x [B, H, N, head_dim]
        iq, ik = self.img_q_norm(iq), self.img_k_norm(ik)
        txt_qkv = self.txt_qkv(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))
        tq, tk, tv = rearrange(txt_qkv, "b l (three h d) -> three b h l d", three=3, h=heads)  # 3 x [B, H, L, head_dim]
        tq, tk = self.txt_q_norm(tq), self.txt_k_norm(tk)

        # joint attention over [text | video], RoPE on the frame index
        q, k, v = (torch.cat(pair, dim=2) for pair in ((tq, iq), (tk, ik), (tv, iv)))  # [B, H, S, head_dim]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attention(q, k, v, mask, self.cfg.manual_attention, block_ends)
        out = rearrange(out, "b h s d -> b s (h d)")                          # [B, S, D]
        txt_attn, img_attn = out[:, :L], out[:, L:]

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
class MMDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 2 or cfg.width % 4:
            raise ValueError(f"width {cfg.width} must split into {cfg.heads} heads of even size and be divisible by 4")
        self.cfg = cfg
        p, D = cfg.patch_size, cfg.width
        self.x_embedder = nn.Linear(cfg.in_channels * p * p, D)            # patchify is a rearrange + linear
        self.t_embedder = TimestepEmbedder(cfg)
        self.y_embedder = nn.Sequential(nn.Linear(cfg.pooled_dim, D), nn.SiLU(), nn.Linear(D, D))  # pooled text
        self.context_embedder = nn.Linear(cfg.text_dim, D)                   # text tokens -> text stream
        self.blocks = nn.ModuleList(MMDiTBlock(cfg, last=(i == cfg.depth - 1)) for i in range(cfg.depth))
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

    def forward(self, frames, text, text_mask, pooled, t, all_frames: bool = False, grid=None):
        """frames: list of [B, C, h_j, w_j], oldest first, the last one the noisy current frame.
        text [B, L, text_dim], text_mask [B, L] bool (True = real token), pooled [B, pooled_dim],
        t [B] in [0, 1] (0 = noise). Returns the velocity [B, C, h, w] of the current frame, or with
        all_frames=True (full-sequence baseline, every frame noisy at t) [B, C, T, h, w].
        grid: the (rows, cols) of pixels that positions refer to; None = the current frame's own
        grid (the paper's extrapolation across stages). Passing the full-resolution size instead
        interpolates a low-stage current frame onto the full grid, as history frames are."""
        self.check_frames(frames, all_frames)
        cfg, p = self.cfg, self.cfg.patch_size
        T, L = len(frames), text.shape[1]
        H, W = (s // p for s in frames[-1].shape[-2:])                    # current token grid
        H_pos, W_pos = (H, W) if grid is None else (grid[0] // p, grid[1] // p)  # positions' grid
        device = frames[-1].device

        tokens, positions, frame_ids = [], [], []
        for j, x in enumerate(frames):
            h, w = x.shape[-2] // p, x.shape[-1] // p
            tokens.append(rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p))  # [B, h*w, C*p*p]
            positions.append(spatial_positions(h, w, H_pos, W_pos, device))
            frame_ids.append(torch.full((h * w,), j, device=device))
        frame_ids = torch.cat(frame_ids)                                       # [N]
        img = self.x_embedder(torch.cat(tokens, 1))                            # [B, N, D]
        img = img + sincos_embed_2d(torch.cat(positions), cfg.width).to(img.dtype)
        txt = self.context_embedder(text)                                      # [B, L, D]

        # conditioning: time embedding + pooled text. History is clean data (t = 1) whatever t is;
        # text tokens belong to frame 0, so they take frame 0's conditioning.
        y = self.y_embedder(pooled)                                            # [B, D]
        vec = self.t_embedder(t) + y
        vec_clean = self.t_embedder(torch.ones_like(t)) + y
        img_vec = torch.stack([vec_clean, vec], dim=1)                         # [B, 2, D]
        img_is_noisy = torch.ones_like(frame_ids) if all_frames else (frame_ids == T - 1).long()  # [N]
        txt_vec = vec if (T == 1 or all_frames) else vec_clean

        frame_of_token = torch.cat([torch.zeros(L, dtype=frame_ids.dtype, device=device), frame_ids])  # [S]
        video_valid = torch.ones(text.shape[0], len(frame_ids), dtype=torch.bool, device=device)
        key_valid = torch.cat([text_mask.bool(), video_valid], dim=1)          # [B, S]
        per_frame = cfg.causal and cfg.per_frame_attention                     # causality by slicing, not masking
        mask = block_causal_mask(frame_of_token, key_valid, causal=cfg.causal and not per_frame)
        # query blocks for per-frame attention: text joins frame 0's block
        block_ends = [L + n for n in accumulate(x.shape[1] for x in tokens)] if per_frame else None
        rope = rope_angles(frame_of_token, cfg.width // cfg.heads, cfg.rope_theta)  # [S, head_dim/2]

        for block in self.blocks:
            args = (img, txt, img_vec, img_is_noisy, txt_vec, rope, mask, block_ends)
            if cfg.grad_checkpointing and self.training:
                img, txt = checkpoint(block, *args, use_reentrant=False)
            else:
                img, txt = block(*args)

        if all_frames:                                                         # every frame is noisy
            out = self.final_layer(img, vec)                                   # [B, T*H*W, p*p*C]
            return rearrange(out, "b (t h w) (c p1 p2) -> b c t (h p1) (w p2)", t=T, h=H, w=W, p1=p, p2=p)
        out = self.final_layer(img[:, -H * W:], vec)                           # [B, H*W, p*p*C], current frame
        return rearrange(out, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=H, w=W, p1=p, p2=p)  # [B, C, h, w]


# ----------------------------------------------------------------------------- toy text encoder
class ToyTextEncoder(nn.Module):
    """Captions -> (tokens [B, L, text_dim], mask [B, L] bool, pooled [B, pooled_dim]), no download.

    The interface T5 (tokens + mask) and CLIP (pooled) fill in the paper. Lower-cased words are
    hashed with zlib.crc32 (stable across runs, unlike Python's salted hash) into vocab_size
    buckets; a learned word embedding plus a learned position embedding gives the tokens, and a
    linear of their masked mean gives the pooled vector. No self-attention here: the text stream
    of the MM-DiT already mixes the words. Trained jointly with the DiT in the toy presets.
    The empty caption "" (the null caption of classifier-free guidance) is all padding: its
    tokens are zero, its mask all False and its pooled vector the bias of the linear (finite).
    """

    def __init__(self, text_dim: int, pooled_dim: int, vocab_size: int = 1024, max_len: int = 32):
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.word_emb = nn.Embedding(vocab_size, text_dim)
        self.pos_emb = nn.Parameter(torch.randn(max_len, text_dim) * 0.02)  # small, as GPT-2's
        self.pool = nn.Linear(text_dim, pooled_dim)

    def tokenize(self, caption: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", caption.lower())[: self.max_len]
        return [zlib.crc32(word.encode()) % self.vocab_size for word in words]

    def forward(self, captions: list[str]):
        ids = [self.tokenize(c) for c in captions]
        L = max(1, max(len(i) for i in ids))                                   # >= 1 so "" gives [B, 1]
        device = self.pos_emb.device
        mask = torch.tensor([[j < len(i) for j in range(L)] for i in ids], device=device)  # [B, L]
        padded = torch.tensor([i + [0] * (L - len(i)) for i in ids], device=device)     # [B, L]
        tokens = (self.word_emb(padded) + self.pos_emb[:L]) * mask[..., None]   # [B, L, text_dim]
        mean = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)           # [B, text_dim]
        return tokens, mask, self.pool(mean)


# ----------------------------------------------------------------------------- text + DiT
class TextToVideo(nn.Module):
    """The trainable pair of the toy presets: captions -> ToyTextEncoder -> MMDiT.

    forward(frames, captions, t) is the velocity of the current frame; `guided` adds
    classifier-free guidance, v = v_u + w (v_c - v_u), with the empty caption as the null text
    (the presets drop 10% of captions to "" in training), both halves in one batched call.
    """

    def __init__(self, cfg: DiTConfig, vocab_size: int = 1024, max_len: int = 32):
        super().__init__()
        self.text_encoder = ToyTextEncoder(cfg.text_dim, cfg.pooled_dim, vocab_size, max_len)
        self.dit = MMDiT(cfg)

    def forward(self, frames, captions, t, all_frames: bool = False, grid=None):
        text, mask, pooled = self.text_encoder(captions)
        return self.dit(frames, text, mask, pooled, t, all_frames=all_frames, grid=grid)

    def guided(self, frames, captions, t, guidance: float = 1.0, grid=None, all_frames: bool = False):
        if guidance == 1.0:
            return self(frames, captions, t, all_frames=all_frames, grid=grid)
        B = len(captions)
        both = [torch.cat([x, x]) for x in frames]                             # [2B, C, h, w] each
        v_c, v_u = self(both, list(captions) + [""] * B, torch.cat([t, t]), all_frames, grid).chunk(2)
        return v_u + guidance * (v_c - v_u)                                    # CFG
