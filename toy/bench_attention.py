"""Benchmark: blockwise-causal attention as one masked SDPA call vs per-frame SDPA over the prefix.

Sec. 3.4 of the paper runs full attention with a blockwise-causal mask. A masked SDPA call on CPU
still computes every masked-out score. The alternative, `attention(..., block_ends=...)` in dit.py
(DiTConfig.per_frame_attention), splits the queries by frame and lets each block attend, without
a causal mask, to the keys of its own and earlier frames (a contiguous prefix, since the sequence
is sorted by frame); only the text padding is masked, with a [B, 1, 1, S] mask. Same result up to
rounding, fewer scores, and no S x S mask.

Two layouts at about 1k and 4k tokens: the temporal pyramid of Eq. 16 (3 frames at high
resolution, the older ones at 1/4: most queries belong to late frames, little is saved) and the
full-sequence layout of Fig. 8 (equal frames: about half the scores are masked out).

Run from the repository root:  OMP_NUM_THREADS=1 python -m toy.bench_attention
Forward + backward, batch 1, 4 heads of 64, fp32, median of a few repeats, one thread.
"""
import time

import torch

from dit import attention, block_causal_mask

HEADS, HEAD_DIM = 4, 64
TEXT_LEN, TEXT_PAD = 32, 8  # 32 text tokens, the last 8 of them padding
REPEATS = 3


def layouts():
    """name -> token count of each frame, oldest first."""
    return {
        # Eq. 16: ... 1/4-res frames, frame i-2 at 1/2, frame i-1 and current at full resolution
        "pyramid ~1k": [16] * 28 + [64, 256, 256],        # full frame 16x16 tokens
        "pyramid ~4k": [64] * 27 + [256, 1024, 1024],     # full frame 32x32 tokens
        # Fig. 8 full sequence: all frames at full resolution
        "full-seq ~1k": [256] * 4,
        "full-seq ~4k": [256] * 16,
    }


def time_fwd_bwd(fn, q, k, v):
    times = []
    for _ in range(REPEATS):
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        t0 = time.perf_counter()
        out = fn(qq, kk, vv)
        out.square().sum().backward()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out.detach(), torch.cat([qq.grad, kk.grad, vv.grad])


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"{'layout':14s} {'tokens':>6s} {'masked SDPA':>12s} {'per-frame':>10s} {'ratio':>6s} {'max |diff|':>10s}")
    for name, sizes in layouts().items():
        frame_of_token = torch.cat([torch.zeros(TEXT_LEN, dtype=torch.long)] +
                                   [torch.full((n,), j) for j, n in enumerate(sizes)])  # [S]
        S = len(frame_of_token)
        key_valid = torch.ones(1, S, dtype=torch.bool)
        key_valid[:, TEXT_LEN - TEXT_PAD:TEXT_LEN] = False
        # text belongs to frame 0
        block_ends = (torch.tensor(sizes).cumsum(0) + TEXT_LEN).tolist()
        # 3 x [1, H, S, head_dim]
        q, k, v = torch.randn(3, 1, HEADS, S, HEAD_DIM).unbind(0)

        mask = block_causal_mask(frame_of_token, key_valid)
        t_mask, out_mask, grad_mask = time_fwd_bwd(lambda q, k, v: attention(q, k, v, mask), q, k, v)
        # [1, 1, 1, S] key padding only
        pad = block_causal_mask(frame_of_token, key_valid, causal=False)
        t_pre, out_pre, grad_pre = time_fwd_bwd(lambda q, k, v: attention(q, k, v, pad, block_ends=block_ends), q, k, v)
        diff = max((out_mask - out_pre).abs().max().item(), (grad_mask - grad_pre).abs().max().item())
        assert diff < 1e-4, f"per-frame attention differs from masked SDPA by {diff}"
        print(f"{name:14s} {S:6d} {t_mask * 1e3:10.1f}ms {t_pre * 1e3:8.1f}ms {t_mask / t_pre:6.2f} {diff:10.1e}")


if __name__ == "__main__":
    main()
