"""The 3D causal video VAE of Pyramidal Flow Matching (Jin et al., ICLR 2025, App. B).

App. B: a MAGVIT-v2-like VAE with 3D causal convolutions, an asymmetric encoder-decoder (the
decoder is deeper), KL-regularised continuous latents, 8x8x8 compression and 16 latent channels.
Causal means latent frame j sees pixel frames <= f*j only, so `1 + f*k` frames <-> `1 + k`
latents and latent 0 is an image latent: images are one-frame videos of the same model.

Tensor legend: video [B, C, T, H, W] (pixels in [-1, 1]); latents [B, C, T, h, w] with
T = 1 + k latent frames, h = H/s, w = W/s for spatial factor s and temporal factor f.

The defaults are this repository's layout; the authors' release differs in a few places, each a
VAEConfig option (convert.py sets them to load the release's weights, to about 1e-5).
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class VAEConfig:
    latent_channels: int = 16
    widths: tuple = (128, 256, 512, 512)  # channels per level; len(widths) - 1 resampling steps
    spatial_factor: int = 8               # s: a power of 2, <= 2 ** (len(widths) - 1)
    temporal_factor: int = 8              # f: a power of 2, <= 2 ** (len(widths) - 1)
    enc_blocks: int | tuple = 2           # ResNet blocks per encoder level (or one count per level)
    dec_blocks: int | tuple = 3           # per decoder level (top first): the decoder is deeper
    norm_groups: int = 32                 # per-frame GroupNorm groups; 0: no normalisation
    kernel: int = 3                       # conv kernel in t, h and w
    logvar_init: float = 0.0              # bias of the logvar output at init (see Encoder)
    logvar_min: float = -30.0             # clamp of the posterior log-variance: exp() stays finite
    logvar_max: float = 20.0
    # The authors' release differs in layout: convert.py sets these to load its weights (each
    # default is this repository's, the release's value in brackets)
    time_padding: str = "replicate"       # front of a clip in time: copies of frame 0 or "zeros" ("zeros")
    norm_eps: float = 1e-5                # GroupNorm epsilon (1e-6)
    mid_attention: bool = False           # single-head attention per frame between the mid ResBlocks (True)
    resampling: str = "joint"             # one conv a step, or "separate" convs for space and time ("separate")
    spatial_steps: tuple = ()             # flags: which of the len(widths)-1 steps halve space; (): the first
    temporal_steps: tuple = ()            # which halve time; (): the last (the release's config.json names them)
    quant_convs: bool = False             # 1x1x1 convs after the encoder and before the decoder (True)

    def latent_frames(self, frames: int) -> int:
        """Latent frames of a clip of `frames` pixel frames: 1 + f*k -> 1 + k (latent 0 is the image
        latent of frame 0); ValueError for a count the causal VAE does not take."""
        f = self.temporal_factor
        if frames < 1 or (frames - 1) % f:
            raise ValueError(f"must be 1 + {f}*k (the VAE compresses time {f}x)")
        return 1 + (frames - 1) // f


VAE_SIZES = {
    # laptop: 32x32 clips of 1 + 2k frames -> 8x8 latents of 1 + k frames. No normalisation: in
    # short CPU runs per-frame GroupNorm trained slower (images, 300 steps: 24.0 dB without, 20.9
    # with; the paper size keeps it)
    "toy": VAEConfig(latent_channels=4, widths=(16, 32, 32), spatial_factor=4, temporal_factor=2,
                     enc_blocks=1, dec_blocks=1, norm_groups=0, logvar_init=-8.0),
    # the paper: 8x8x8 compression, 16 channels (App. B)
    "paper": VAEConfig(),
}


class CausalConv3d(nn.Module):
    """3D conv padded in front in time only (output frame j reads input frames <= stride * j),
    "same" zero-padded in space. The front padding replicates the first frame (as if the clip had
    been still before it started: a one-frame clip then behaves like an image) or, with
    padding="zeros", is zeros (the release). While a clip is fed in time chunks (`stream`), the
    input frames the next output still reads (at most kt - 1) are kept and replace the padding
    of the next chunk, so chunked output equals the full output."""

    def __init__(self, c_in, c_out, kernel=3, stride=(1, 1, 1), padding="replicate"):
        super().__init__()
        self.time_pad, self.time_stride, self.zeros = kernel - 1, stride[0], padding == "zeros"
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2))
        # He init (torch's default is ~2.5x smaller: a toy run measured 2 dB worse at 300 steps).
        # The earlier time taps start at zero: the net starts as a per-frame image net and learns
        # to use the past, which trains far faster than undoing a random mix of moving objects.
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        with torch.no_grad():
            self.conv.weight[:, :, :-1] = 0.0
        self.stream, self.cache = False, None

    def forward(self, x):
        if self.cache is not None:
            front = self.cache
        elif self.zeros:
            front = x.new_zeros(x.shape[0], x.shape[1], self.time_pad, *x.shape[3:])
        else:
            front = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
        x = torch.cat([front, x], dim=2)  # [B, C, time_pad + T, H, W]
        if self.stream:  # keep the frames from the next output's first tap on
            outputs = (x.shape[2] - self.time_pad - 1) // self.time_stride + 1
            self.cache = x[:, :, outputs * self.time_stride:]  # [B, C, <= time_pad, H, W]
        return self.conv(x)

    def reset(self):
        self.stream, self.cache = False, None


class FrameNorm(nn.GroupNorm):
    """GroupNorm over (channels, h, w) of each frame separately: statistics never mix time steps,
    which would break causality."""

    def forward(self, x):
        t = x.shape[2]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        return rearrange(super().forward(x), "(b t) c h w -> b c t h w", t=t)


def frame_norm(cfg, channels):
    """FrameNorm with cfg.norm_groups groups; 0 groups means no normalisation (the identity)."""
    return FrameNorm(cfg.norm_groups, channels, eps=cfg.norm_eps) if cfg.norm_groups else nn.Identity()


def causal_conv(cfg, c_in, c_out, kernel=None, stride=(1, 1, 1)):
    return CausalConv3d(c_in, c_out, cfg.kernel if kernel is None else kernel, stride, cfg.time_padding)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, cfg):
        super().__init__()
        self.norm1 = frame_norm(cfg, c_in)
        self.conv1 = causal_conv(cfg, c_in, c_out)
        self.norm2 = frame_norm(cfg, c_out)
        self.conv2 = causal_conv(cfg, c_out, c_out)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        # The residual branch starts at zero: every block starts as its skip path (SkipInit).
        nn.init.zeros_(self.conv2.conv.weight)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class FrameAttention(nn.Module):
    """Single-head self-attention among the h*w positions of each frame (per frame: causal),
    pre-normalised and residual: the release's middle blocks hold one between their ResBlocks."""

    def __init__(self, c, cfg):
        super().__init__()
        self.norm = frame_norm(cfg, c)
        self.q, self.k, self.v, self.out = (nn.Linear(c, c) for _ in range(4))
        nn.init.zeros_(self.out.weight)  # starts as the identity, like the ResBlocks

    def forward(self, x):
        t, h = x.shape[2], x.shape[3]
        a = rearrange(self.norm(x), "b c t h w -> (b t) (h w) c")
        a = F.scaled_dot_product_attention(self.q(a), self.k(a), self.v(a))  # scale 1/sqrt(c)
        return x + rearrange(self.out(a), "(b t) (h w) c -> b c t h w", t=t, h=h)


class Streaming(nn.Module):
    """A resampler whose first call holds the clip's frame 0; while a clip is fed in time chunks
    (`stream`), only the first chunk does."""

    def __init__(self):
        super().__init__()
        self.stream, self.seen_first = False, False

    def first_call(self):
        """True on the call that holds frame 0 (then remembers, while streaming, that it passed)."""
        first, self.seen_first = not self.seen_first, self.stream
        return first

    def reset(self):
        self.stream, self.seen_first = False, False


class Downsample(Streaming):
    """Halves space and/or time at the end of an encoder level.
    "joint": one conv. In time, the two pixel frames 2j-1 and 2j that latent frame j summarises
    are stacked as channels before it (frame 0, alone in its span, is paired with itself, as the
    replicate padding would), so every output sees both frames of its span from the start:
    1 + 2m -> 1 + m frames; the conv is causal over the stacked pairs: output j reads frames <= 2j.
    "separate" (the release): a conv of stride 2 in space, then a causal conv of stride 2 in time
    (output j reads frames 2j-2, 2j-1, 2j: 1 + 2m -> 1 + m frames)."""

    def __init__(self, c, cfg, space, time):
        super().__init__()
        self.time, self.joint = time, cfg.resampling == "joint"
        if self.joint:
            self.conv = causal_conv(cfg, c * (1 + time), c, stride=(1, 1 + space, 1 + space))
        else:
            self.space_conv = causal_conv(cfg, c, c, stride=(1, 2, 2)) if space else None
            self.time_conv = causal_conv(cfg, c, c, stride=(2, 1, 1)) if time else None

    def forward(self, x):
        if not self.joint:
            for conv in (self.space_conv, self.time_conv):
                x = x if conv is None else conv(x)
            return x
        if self.time:
            if self.first_call():
                x = torch.cat([x[:, :, :1], x], dim=2)  # [B, C, 2 + 2m, H, W]: frame 0 twice
            x = rearrange(x, "b c (t r) h w -> b (c r) t h w", r=2)  # [B, 2C, 1 + m, H, W]
        return self.conv(x)


class Upsample(Streaming):
    """Doubles space and/or time at the end of a decoder level. In time, sub-pixel: a conv makes
    2C channels per latent-rate frame, unpacked as (c r) into the frames 2j-1 and 2j of latent
    j's span; the first sub-frame of the clip's first frame is dropped (latent 0 is the image
    frame alone): 1 + m -> 1 + 2m. In space, "joint": nearest x2, then one conv making the time
    channels too; "separate" (the release): a conv making 4C channels unpacked as (c p q) into
    2x2 pixels, then a second conv for time."""

    def __init__(self, c, cfg, space, time):
        super().__init__()
        self.space, self.time, self.joint = space, time, cfg.resampling == "joint"
        if self.joint:
            self.conv = causal_conv(cfg, c, c * (1 + time))
            if time:  # both sub-frames start as the same map (nearest repeat), then learn to differ
                with torch.no_grad():
                    self.conv.conv.weight[1::2] = self.conv.conv.weight[0::2]
                    self.conv.conv.bias[1::2] = self.conv.conv.bias[0::2]
        else:
            self.space_conv = causal_conv(cfg, c, 4 * c) if space else None
            self.time_conv = causal_conv(cfg, c, 2 * c) if time else None

    def forward(self, x):
        if self.joint:
            if self.space:
                x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # [B, C, T, 2H, 2W]
            return self._split_time(self.conv(x)) if self.time else self.conv(x)
        if self.space:
            # [B, 4C, T, H, W] -> [B, C, T, 2H, 2W]
            x = rearrange(self.space_conv(x), "b (c p q) t h w -> b c t (h p) (w q)", p=2, q=2)
        return self._split_time(self.time_conv(x)) if self.time else x

    def _split_time(self, x):
        x = rearrange(x, "b (c r) t h w -> b c (t r) h w", r=2)  # [B, C, 2T, H, W]
        return x[:, :, 1:] if self.first_call() else x  # [B, C, 2T - 1, H, W] on frame 0's call


def _resampling(cfg):
    """(space, time) flags of each of the len(widths) - 1 resampling steps, from the top level:
    by default space at the first log2(s) steps, time at the last log2(f) (cheapest at low
    resolution); cfg.spatial_steps / temporal_steps name them explicitly."""
    if cfg.time_padding not in ("replicate", "zeros") or cfg.resampling not in ("joint", "separate"):
        raise ValueError(f"time_padding {cfg.time_padding!r} / resampling {cfg.resampling!r} is not an option")
    n = len(cfg.widths) - 1
    ls, lt = int(math.log2(cfg.spatial_factor)), int(math.log2(cfg.temporal_factor))
    if 2 ** ls != cfg.spatial_factor or 2 ** lt != cfg.temporal_factor or max(ls, lt) > n:
        raise ValueError(f"factors s={cfg.spatial_factor}, f={cfg.temporal_factor} must be powers of 2 <= 2**{n}")
    space = tuple(cfg.spatial_steps) or tuple(i < ls for i in range(n))
    time = tuple(cfg.temporal_steps) or tuple(i >= n - lt for i in range(n))
    if len(space) != n or len(time) != n or sum(space) != ls or sum(time) != lt:
        raise ValueError(f"spatial_steps {space} / temporal_steps {time} must be {n} flags making s and f")
    return list(zip(space, time))


def _per_level(blocks, n):
    """ResNet blocks per level: one count for all n levels, or a count per level."""
    return (blocks,) * n if isinstance(blocks, int) else tuple(blocks)


def _middle(cfg):
    c = cfg.widths[-1]
    attention = [FrameAttention(c, cfg)] if cfg.mid_attention else []
    return nn.Sequential(ResBlock(c, c, cfg), *attention, ResBlock(c, c, cfg))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = cfg.widths
        blocks = _per_level(cfg.enc_blocks, len(w))
        self.conv_in = causal_conv(cfg, 3, w[0])
        self.blocks = nn.ModuleList()
        for i, (space, time) in enumerate(_resampling(cfg) + [(False, False)]):
            for j in range(blocks[i]):
                self.blocks.append(ResBlock(w[i - 1] if j == 0 and i > 0 else w[i], w[i], cfg))
            if space or time:
                self.blocks.append(Downsample(w[i], cfg, space, time))
        self.mid = _middle(cfg)
        self.norm_out = frame_norm(cfg, w[-1])
        self.conv_out = causal_conv(cfg, w[-1], 2 * cfg.latent_channels)  # mean and logvar
        c2 = 2 * cfg.latent_channels
        self.quant = causal_conv(cfg, c2, c2, kernel=1) if cfg.quant_convs else nn.Identity()
        # A short run cannot wait for the encoder to shrink the posterior std from 1 (noise that
        # buries the small initial means): the toy starts it small; the KL term still acts.
        nn.init.constant_(self.conv_out.conv.bias[cfg.latent_channels:], cfg.logvar_init)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.blocks:
            x = block(x)
        return self.quant(self.conv_out(F.silu(self.norm_out(self.mid(x)))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w, c = cfg.widths, cfg.latent_channels
        blocks = _per_level(cfg.dec_blocks, len(w))
        self.post_quant = causal_conv(cfg, c, c, kernel=1) if cfg.quant_convs else nn.Identity()
        self.conv_in = causal_conv(cfg, c, w[-1])
        self.mid = _middle(cfg)
        self.blocks = nn.ModuleList()
        steps = _resampling(cfg)
        for i in reversed(range(len(w))):
            for j in range(blocks[i]):
                self.blocks.append(ResBlock(w[i + 1] if j == 0 and i + 1 < len(w) else w[i], w[i], cfg))
            if i > 0 and any(steps[i - 1]):
                self.blocks.append(Upsample(w[i], cfg, *steps[i - 1]))
        self.norm_out = frame_norm(cfg, w[0])
        self.conv_out = causal_conv(cfg, w[0], 3)

    def forward(self, z):
        x = self.mid(self.conv_in(self.post_quant(z)))
        for block in self.blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


@contextmanager
def streaming(net):
    """Within: `net` is fed one clip in time chunks, in order (its causal convs carry their last
    input frames over, only the first chunk holds frame 0). After: no state is left behind."""
    parts = [m for m in net.modules() if isinstance(m, (CausalConv3d, Streaming))]
    for m in parts:
        m.stream = True
    try:
        yield
    finally:
        for m in parts:
            m.reset()


def _sample(mean, logvar, generator=None):
    """z = mean + sigma * eps (reparameterisation); eps from `generator` (CPU by default)."""
    eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator else "cpu")
    return mean + (0.5 * logvar).exp() * eps.to(mean)


def kl(mean, logvar):
    """KL( N(mean, exp(logvar)) || N(0, I) ) of a diagonal Gaussian, summed per sample: [B]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


# The release's pipeline normalises latents outside its VAE, (z - shift) / scale, frame 0 apart:
# (shift, scale) of frame 0 and of the later frames, for the MM-DiT (sd3) and the FLUX (miniflux) model.
# Its extraction stores raw posterior samples; this repo's stores normalised means (vae.normalize).
RELEASE_LATENT_STATS = {"mmdit": ((0.1490, 1.8415), (-0.2343, 3.0986)),
                        "flux": ((-0.04, 1.8726), (-0.2343, 3.0986))}


def normalize_release(z, model="mmdit"):
    """Raw latents [..., T, h, w] of the release's extraction (clip frame 0 first) -> the normalised
    latents the DiT takes: frame 0 and the later frames with their own (shift, scale)."""
    (s0, c0), (s1, c1) = RELEASE_LATENT_STATS[model]
    return torch.cat([(z[..., :1, :, :] - s0) / c0, (z[..., 1:, :, :] - s1) / c1], dim=-3)


class CausalVAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        # latent normalisation, row 0 for the image latent (frame 0), row 1 for the later frames:
        # their statistics differ (frame 0 summarises 1 pixel frame, the others f). Buffers, so they
        # are saved with the weights; set them with estimate_latent_stats.
        self.register_buffer("latent_shift", torch.zeros(2, cfg.latent_channels))
        self.register_buffer("latent_scale", torch.ones(2, cfg.latent_channels))

    def check_input(self, x):
        s, f = self.cfg.spatial_factor, self.cfg.temporal_factor
        if x.ndim != 5:
            raise ValueError(f"expected video [B, 3, T, H, W], got shape {tuple(x.shape)} (an image is x[:, :, None])")
        if (x.shape[2] - 1) % f:
            raise ValueError(f"frame count {x.shape[2]} is not 1 + {f}*k (temporal factor {f})")
        if x.shape[3] % s or x.shape[4] % s:
            raise ValueError(f"size {x.shape[3]}x{x.shape[4]} is not divisible by the spatial factor {s}")

    def posterior(self, x, chunk=None):
        """pixels [B, 3, 1 + f*k, H, W] -> mean, logvar, each [B, C, 1 + k, H/s, W/s].
        chunk: latent frames per encoder call (None: one call). Pixel frame 0 goes alone first,
        then f*chunk frames a call, the causal convs carrying their last input frames over (at
        most kernel - 1 each): equal to one call up to float round-off (no layer mixes frames
        but the causal convs: GroupNorm and attention are per frame). Memory is bounded: a call
        holds the activations of f*chunk (+ kernel - 1) frames, whatever the clip's length: the
        release's VAE on 241 frames of 768x1280 has a largest activation of 56.5 GiB (bf16) in
        one call, 3.8 GiB at chunk=2 (tests/test_release_vae.py, on the meta device)."""
        self.check_input(x)
        f, frames = self.cfg.temporal_factor, x.shape[2]
        if chunk is None or 1 + f * chunk >= frames:
            moments = self.encoder(x)  # [B, 2C, 1 + k, h, w]
        else:
            with streaming(self.encoder):
                spans = [x[:, :, :1]] + [x[:, :, i:i + f * chunk] for i in range(1, frames, f * chunk)]
                moments = torch.cat([self.encoder(span) for span in spans], dim=2)
        mean, logvar = moments.chunk(2, dim=1)  # the release's order: [mean | logvar]
        return mean, logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)

    def encode(self, x, sample=False, generator=None, chunk=None):
        """pixels -> latents: the posterior mean, or a sample of it. chunk: see posterior."""
        mean, logvar = self.posterior(x, chunk)
        return _sample(mean, logvar, generator) if sample else mean

    @property
    def last_layer(self):
        """The decoder's last weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.conv.weight

    def forward(self, x, sample=True, generator=None):
        """Training pass: pixels -> (reconstruction, mean, logvar)."""
        mean, logvar = self.posterior(x)
        z = _sample(mean, logvar, generator) if sample else mean
        return self.decoder(z), mean, logvar

    def _decode_chunks(self, z, chunk):
        """Decode latent frames `chunk` at a time; causal convs carry their last frames over."""
        if chunk is None or chunk >= z.shape[2]:
            return self.decoder(z)
        with streaming(self.decoder):
            return torch.cat([self.decoder(z[:, :, i:i + chunk]) for i in range(0, z.shape[2], chunk)], dim=2)

    def decode(self, z, chunk=None, tile=None, overlap=None):
        """latents [B, C, 1 + k, h, w] -> pixels [B, 3, 1 + f*k, s*h, s*w].
        chunk: latent frames per temporal chunk (exact). tile: latent tile side (approximate: a
        tile sees no context beyond its border and has its own GroupNorm statistics), tiles
        overlapping by `overlap` latent pixels (default tile // 4) and blended linearly there."""
        h, w = z.shape[3:]
        if tile is None or (tile >= h and tile >= w):
            return self._decode_chunks(z, chunk)
        s = self.cfg.spatial_factor
        overlap = tile // 4 if overlap is None else overlap
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
        ys = _tile_starts(h, tile, tile - overlap)
        xs = _tile_starts(w, tile, tile - overlap)
        out = weight = 0.0
        for y0 in ys:
            for x0 in xs:
                y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                # [B, 3, T, s*(y1-y0), s*(x1-x0)]
                pix = self._decode_chunks(z[:, :, :, y0:y1, x0:x1], chunk)
                ramp = (_ramp(s * (y1 - y0), s * overlap, y0 > 0, y1 < h)[:, None]
                        * _ramp(s * (x1 - x0), s * overlap, x0 > 0, x1 < w)[None, :]).to(pix)
                # place the tile in the full frame
                pad = (s * x0, s * (w - x1), s * y0, s * (h - y1))
                out = out + F.pad(pix * ramp, pad)
                weight = weight + F.pad(ramp, pad)
        return out / weight

    def normalize(self, z, start=0):
        """Latents -> roughly zero-mean, unit-variance latents for the DiT. `start`: the index of
        z's first frame in its clip (a later frame alone, e.g. in autoregressive sampling, is 1)."""
        shift, scale = self._frame_stats(z, start)
        return (z - shift) / scale

    def denormalize(self, z, start=0):
        shift, scale = self._frame_stats(z, start)
        return z * scale + shift

    def _frame_stats(self, z, start):
        """Row 0 of the stats for clip frame 0, row 1 for the later ones: [1, C, T, 1, 1]."""
        rows = torch.ones(z.shape[2], dtype=torch.long, device=z.device)
        if start == 0:
            rows[0] = 0
        shift = rearrange(self.latent_shift[rows], "t c -> 1 c t 1 1")
        scale = rearrange(self.latent_scale[rows], "t c -> 1 c t 1 1")
        return shift.to(z), scale.to(z)


def _tile_starts(size, tile, step):
    """Start offsets of tiles of side `tile` covering [0, size); the last one ends at `size`."""
    starts = list(range(0, max(size - tile, 0), step))
    return starts + [max(size - tile, 0)]


def _ramp(n, overlap, ramp_in, ramp_out):
    """Blending weight along one tile side of n pixels: rising linearly over the first `overlap`
    pixels (unless at the frame border) and falling over the last: two neighbours sum to 1."""
    p = torch.arange(n, dtype=torch.float32) + 0.5
    r = torch.ones(n)
    if overlap > 0 and ramp_in:
        r = torch.minimum(r, p / overlap)
    if overlap > 0 and ramp_out:
        r = torch.minimum(r, (n - p) / overlap)
    return r


@torch.no_grad()
def estimate_latent_stats(vae, batches):
    """Set vae.latent_shift/scale to the per-channel mean/std of the posterior means over
    `batches` (an iterable of pixel videos), separately for latent frame 0 and the later frames.
    Image-only data leaves no later frames: they then share frame 0's statistics."""
    # [first/later, n/sum/sum2, C]
    sums = torch.zeros(2, 3, vae.cfg.latent_channels, dtype=torch.float64)
    for x in batches:
        z = vae.encode(x).double()
        for row, part in ((0, z[:, :, :1]), (1, z[:, :, 1:])):
            zc = rearrange(part, "b c t h w -> c (b t h w)")
            sums[row] += torch.stack([torch.full_like(zc[:, 0], zc.shape[1]), zc.sum(1), zc.pow(2).sum(1)]).cpu()
    if sums[1, 0, 0] == 0:
        sums[1] = sums[0]
    n, mean = sums[:, 0], sums[:, 1] / sums[:, 0]
    std = (sums[:, 2] / n - mean ** 2).clamp_min(1e-12).sqrt()
    vae.latent_shift.copy_(mean.float())
    vae.latent_scale.copy_(std.float())
    return vae.latent_shift, vae.latent_scale


class PatchDiscriminator(nn.Module):
    """PatchGAN on each frame (images and videos alike): one real/fake logit per patch.
    Frame-wise, so it judges texture, which is what the pixel loss blurs."""

    def __init__(self, width=64, n_layers=3, norm_groups=8):
        super().__init__()
        layers, c = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for i in range(1, n_layers):
            c_next = width * 2 ** i
            layers += [nn.Conv2d(c, c_next, 4, 2, 1), nn.GroupNorm(norm_groups, c_next), nn.LeakyReLU(0.2)]
            c = c_next
        layers += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        x = rearrange(x, "b c t h w -> (b t) c h w")
        return self.net(x)  # [B*T, 1, h', w'] patch logits


def adaptive_weight(rec_loss, g_loss, last_layer, max_weight=1e4):
    """VQGAN's balance: ||grad rec|| / ||grad g|| at the decoder's last layer, so the adversarial
    term pushes the decoder about as hard as the reconstruction term."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, max_weight).detach()  # 1e-4: no 0/0


def vae_loss(x, recon, mean, logvar, kl_weight=1e-6, pixel="l1", disc=None, disc_weight=0.5, last_layer=None):
    """Pixel loss + kl_weight * KL (+ the adaptive-weighted hinge generator loss if `disc`).
    Pixel loss: "l1" (the default of image VAEs: sharper than MSE) or "mse"; mean per pixel.
    KL: per latent element (kl / numel), so kl_weight does not depend on the clip size.
    Returns (loss, logs)."""
    rec = (recon - x).abs().mean() if pixel == "l1" else (recon - x).pow(2).mean()
    kl_term = (kl(mean, logvar) / mean[0].numel()).mean()
    loss = rec + kl_weight * kl_term
    logs = {"rec": rec.item(), "kl": kl_term.item()}
    if disc is not None:
        for p in disc.parameters():  # the generator term moves the VAE only
            p.requires_grad_(False)
        g_loss = -disc(recon).mean()  # hinge generator loss
        for p in disc.parameters():
            p.requires_grad_(True)
        w = adaptive_weight(rec, g_loss, last_layer) if torch.is_grad_enabled() else torch.tensor(1.0)
        loss = loss + disc_weight * w * g_loss
        logs.update(g=g_loss.item(), adaptive_w=w.item())
    return loss, logs


def hinge_d_loss(disc, x, recon):
    """Discriminator hinge loss; recon is detached, so it moves the discriminator only."""
    return F.relu(1.0 - disc(x)).mean() + F.relu(1.0 + disc(recon.detach())).mean()


def vae_training_loss(vae, x, disc=None, step=0, disc_start=0, kl_weight=1e-6, pixel="l1", disc_weight=0.5):
    """One training loss for a single optimizer over vae and disc parameters: the generator
    terms reach only the VAE, the hinge term only the discriminator (off before disc_start).
    x: a video [B, 3, 1 + f*k, H, W] (an image batch as x[:, :, None]). Returns (loss, logs)."""
    recon, mean, logvar = vae(x)
    use_disc = disc is not None and step >= disc_start
    loss, logs = vae_loss(x, recon, mean, logvar, kl_weight, pixel,
                          disc if use_disc else None, disc_weight, vae.last_layer)
    if use_disc:
        d_loss = hinge_d_loss(disc, x, recon)
        loss = loss + d_loss
        logs["d"] = d_loss.item()
    return loss, logs


class VAETraining(nn.Module):
    """The VAE and its optional patch discriminator as one module whose forward is the one loss
    (vae_training_loss; train.py's vae task): the generator terms reach only the VAE and the hinge
    term only the discriminator, so the shared loop's single AdamW trains both."""

    def __init__(self, cfg, kl_weight, pixel, disc_weight, disc_start):
        super().__init__()
        self.vae = CausalVAE(cfg)
        self.disc = PatchDiscriminator() if disc_weight > 0 else None
        self.loss_kw = dict(kl_weight=kl_weight, pixel=pixel, disc_weight=disc_weight, disc_start=disc_start)
        # a buffer: it resumes
        self.register_buffer("micro_steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.micro_steps += 1
        loss, _ = vae_training_loss(self.vae, x, self.disc, step=int(self.micro_steps), **self.loss_kw)
        return loss


@torch.no_grad()
def psnr(x, y):
    """PSNR in dB of videos in [-1, 1] (peak-to-peak 2), per clip then averaged over the batch."""
    mse = (x.clamp(-1, 1) - y.clamp(-1, 1)).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean().item()
