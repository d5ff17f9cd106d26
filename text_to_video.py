"""Captions in, velocity out: a text encoder in front of the MM-DiT (dit.py), and classifier-free
guidance (Sec. 4.1; App. B). TextToVideo is the trainable pair of the toy presets (ToyTextEncoder +
MMDiT, trained together); in the full recipe it holds the MM-DiT alone and takes precomputed
features of a frozen encoder (text_encoders.py), extracted once. Its `packed` runs the stage groups
of a training step in one pass (dit.Packing); `guided` and `make_cache` are what sampling calls.

Tensor legend: one latent frame [B, C, h, w]; text tokens [B, L, D], mask [B, L], pooled [B, P].
"""
import re
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import DiTConfig, MMDiT

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
        # >= 1 so "" gives [B, 1]
        L = max(1, max(len(i) for i in ids))
        device = self.pos_emb.device
        mask = torch.tensor([[j < len(i) for j in range(L)] for i in ids], device=device)  # [B, L]
        padded = torch.tensor([i + [0] * (L - len(i)) for i in ids], device=device)     # [B, L]
        tokens = (self.word_emb(padded) + self.pos_emb[:L]) * mask[..., None]   # [B, L, text_dim]
        mean = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)           # [B, text_dim]
        return tokens, mask, self.pool(mean)


# ----------------------------------------------------------------------------- text + DiT
def is_text_features(captions) -> bool:
    """Precomputed text features (a (text, mask, pooled) tuple of tensors or a dict) rather than captions."""
    return isinstance(captions, dict) or (isinstance(captions, tuple) and torch.is_tensor(captions[0]))


def join_text(*features):
    """Batches of text features (text [B_i, L_i, D], mask [B_i, L_i], pooled [B_i, P]) -> one batch,
    each text padded with zero tokens that the mask marks as padding to the longest L."""
    L = max(text.shape[1] for text, _, _ in features)
    text = torch.cat([F.pad(t, (0, 0, 0, L - t.shape[1])) for t, _, _ in features])  # [B, L, D]
    # [B, L]
    mask = torch.cat([F.pad(m.bool(), (0, L - m.shape[1]), value=False) for _, m, _ in features])
    return text, mask, torch.cat([p for _, _, p in features])


class TextToVideo(nn.Module):
    """The trainable pair of the toy presets: captions -> ToyTextEncoder -> MMDiT.

    forward(frames, captions, t) is the velocity of the current frame; `guided` adds
    classifier-free guidance, v = v_u + w (v_c - v_u), with the empty caption as the null text
    (the presets drop 10% of captions to "" in training), both halves in one batched call.
    With toy_text=False (the full recipe) the model has no text encoder of its own: captions come
    as precomputed features (text, mask, pooled) of a frozen encoder, extracted once before
    training; sample.py sets that frozen encoder as .text_encoder to encode new captions.
    """

    def __init__(self, cfg: DiTConfig, vocab_size: int = 1024, max_len: int = 32, toy_text: bool = True):
        super().__init__()
        self.text_encoder = ToyTextEncoder(cfg.text_dim, cfg.pooled_dim, vocab_size, max_len) if toy_text else None
        self.dit = MMDiT(cfg)

    def encode_text(self, captions):
        """Captions (a list of strings) or text features -> (text, mask, pooled)."""
        if isinstance(captions, dict):
            return captions["text"], captions["text_mask"], captions["pooled"]
        if is_text_features(captions):
            return captions
        if self.text_encoder is None:
            raise ValueError("this model has no text encoder: pass text features (text, mask, pooled)")
        return self.text_encoder(captions)

    def both_halves(self, captions, B, null=None):
        """The text of both CFG halves as one [2B] batch: the captions, then the null caption ("",
        or its features `null` [1, ...] when the captions are features)."""
        if not is_text_features(captions):
            return list(captions) + [""] * B
        if null is None:
            raise ValueError("guidance on text features needs null=, the null caption's features")
        return join_text(self.encode_text(captions), tuple(x.expand(B, *x.shape[1:]) for x in null))

    def forward(self, frames, captions, t, all_frames: bool = False, grid=None, cache=None):
        if cache is not None:  # made from these captions: the text is in it
            return self.dit(frames, None, None, None, t, grid=grid, cache=cache)
        text, mask, pooled = self.encode_text(captions)
        return self.dit(frames, text, mask, pooled, t, all_frames=all_frames, grid=grid)

    def packed(self, groups):
        """forward of several groups (dicts of frames, captions, t, all_frames, grid) in one pass of
        the network (MMDiT.packed): a list of their outputs."""
        groups = [dict({k: v for k, v in g.items() if k != "captions"},
                       **dict(zip(("text", "text_mask", "pooled"), self.encode_text(g["captions"])))) for g in groups]
        return self.dit.packed(groups)

    def guided(self, frames, captions, t, guidance: float = 1.0, grid=None, null=None, cache=None,
               all_frames: bool = False):
        """null: the null caption's features [1, ...] (the unconditional half) when captions are features."""
        if guidance == 1.0:
            return self(frames, captions, t, all_frames=all_frames, grid=grid, cache=cache)
        B = frames[-1].shape[0]
        both = [torch.cat([x, x]) for x in frames]                             # [2B, C, h, w] each
        both_text = None if cache is not None else self.both_halves(captions, B, null)
        v_c, v_u = self(both, both_text, torch.cat([t, t]), all_frames=all_frames, grid=grid, cache=cache).chunk(2)
        return v_u + guidance * (v_c - v_u)                                    # CFG

    def make_cache(self, history, captions, size, guidance: float = 1.0, grid=None, base=None, null=None):
        """MMDiT.make_cache for guided(..., cache=) calls with this guidance: with CFG, of both
        halves (conditional and null caption) in one [2B] batch, as guided runs them."""
        if guidance != 1.0:
            captions = self.both_halves(captions, history[-1].shape[0], null)
            history = [torch.cat([x, x]) for x in history]                     # [2B, C, h, w] each
        text, mask, pooled = self.encode_text(captions)
        return self.dit.make_cache(history, text, mask, pooled, size, grid=grid, base=base)
