"""
What a training step costs and how fast it ran: the MM-DiT's model FLOPs from its config and the
step's tokens (Sec. 4.2 counts the tokens; the FLOPs follow from them), MFU against the device's
bf16 peak, and the run's metrics.jsonl (plus TensorBoard scalars when `tensorboard` is installed).

    flops = train_flops(width, depth, video_tokens, text_tokens)   # one sample, forward + backward
    MFU   = model FLOPs of a step / (step time x processes x peak FLOP/s of one device)

Model FLOPs (as PaLM's MFU): the matrix products of the blocks, 2 FLOPs a multiply-add, the backward
twice the forward; the recomputation of grad checkpointing is not counted (it is hardware FLOPs),
nor the patch embedding, the final layer, norms and the per-sample adaLN modulation (small). The
attention counts the whole joint sequence: the blockwise-causal mask skips no work in one SDPA call.
Tensor legend: video [B, C, T, H, W], tokens [B, L, D].
"""
import json
import os
import resource

import torch

# dense bf16 peaks (TFLOP/s) of the data-centre GPUs a run of the full preset would use; the first
# name found in torch.cuda.get_device_name wins (so "H100 PCIe" before "H100")
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0,
                    "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_tflops(device, given=0.0):
    """The peak of one device in TFLOP/s: --peak_tflops when > 0, else the bf16 peak of a known GPU
    (None elsewhere: no MFU on a CPU)."""
    if given > 0:
        return given
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def forward_flops(width, depth, video_tokens, text_tokens, mlp_ratio=4.0):
    """Forward FLOPs of the MM-DiT's blocks for one sample: every token passes its own stream's qkv
    (3 D^2), output projection (D^2) and MLP (2 mlp_ratio D^2); the joint attention multiplies
    Q K^T and A V over all L = video + text tokens (2 L^2 D each). The last block's text stream
    stops after its qkv."""
    per_token = (4 + 2 * mlp_ratio) * width ** 2
    L = video_tokens + text_tokens
    blocks = depth * 2 * (per_token * L + 2 * L * L * width)
    return blocks - 2 * (per_token - 3 * width ** 2) * text_tokens  # the last block's text stream


def train_flops(width, depth, video_tokens, text_tokens, mlp_ratio=4.0):
    """Forward and backward (twice the forward: gradients of activations and of weights)."""
    return 3 * forward_flops(width, depth, video_tokens, text_tokens, mlp_ratio)


def video_step_cost(groups, dit_cfg):
    """(samples, tokens, FLOPs) of one micro-batch of VideoLoss groups: each group's clips see its
    history frames and its current frame (or all frames: the full-sequence baseline) as tokens of
    patch p, and its text tokens (features: their padded length, which the attention computes;
    captions of the toy encoder: a token a word)."""
    samples = tokens = flops = 0
    p = dit_cfg.patch_size
    for g in groups:
        frames = list(g["x_t"].unbind(2)) if g.get("all_frames") else list(g["history"]) + [g["x_t"]]
        video = sum((f.shape[-2] // p) * (f.shape[-1] // p) for f in frames)
        caps = g["captions"]
        text = caps[0].shape[1] if isinstance(caps, tuple) else max(1, *(len(c.split()) for c in caps))
        b = g["x_t"].shape[0]
        samples += b
        tokens += b * (video + text)
        flops += b * train_flops(dit_cfg.width, dit_cfg.depth, video, text, dit_cfg.mlp_ratio)
    return samples, tokens, flops


def peak_memory_gb(device):
    """Peak memory of this process: the CUDA allocator's on a GPU, else the resident set (RSS)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(torch.device(device)) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


class Meter:
    """Sums the steps between two log lines; log() turns them into rates, appends a line to
    out_dir/metrics.jsonl and returns it. Resuming keeps the lines up to the checkpoint's step
    (those after it are done again). peak: TFLOP/s of one device (None: no MFU)."""

    def __init__(self, out_dir, step, world, peak, master):
        self.path, self.world, self.peak, self.master = os.path.join(out_dir, "metrics.jsonl"), world, peak, master
        self.reset()
        self.tb = None
        if master:
            kept = []
            if step and os.path.exists(self.path):
                with open(self.path) as f:  # a line cut short by a kill is dropped
                    kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
            with open(self.path, "w") as f:
                f.writelines(kept)
            try:  # the optional extra
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=step or None)
            except ImportError:
                pass

    def reset(self):
        self.steps, self.seconds, self.samples, self.tokens, self.flops = 0, 0.0, 0, 0, 0.0

    def add(self, seconds, samples, tokens, flops):
        """One optimizer step over all processes: its wall time and its summed samples, tokens, FLOPs."""
        self.steps += 1
        self.seconds += seconds
        self.samples, self.tokens, self.flops = self.samples + samples, self.tokens + tokens, self.flops + flops

    def log(self, step, values, device):
        s = max(self.seconds, 1e-9)
        mfu = self.flops / s / (self.world * self.peak * 1e12) if self.peak and self.flops else None
        record = dict(step=step, **values, step_time=s / max(self.steps, 1), samples_per_s=self.samples / s,
                      tokens_per_s=self.tokens / s, tflops_per_step=self.flops / max(self.steps, 1) / 1e12,
                      mfu=mfu, peak_memory_gb=peak_memory_gb(device))
        self.reset()
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self.tb.add_scalar(k, v, step)
                self.tb.flush()
        return record


def describe(record):
    """The rates of a metrics record as the log line's tail."""
    text = (f"grad {record['grad_norm']:.3f} | {record['step_time']:.2f} s/step {record['tokens_per_s']:,.0f} tok/s "
            f"{record['samples_per_s']:.1f} samples/s")
    if record["mfu"] is not None:
        text += f" MFU {100 * record['mfu']:.1f}%"
    return text + f" mem {record['peak_memory_gb']:.1f} GB"
