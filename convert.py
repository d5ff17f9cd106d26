"""The authors' released weights (and SD3-Medium's) in this repository's checkpoints, and the parity check.

Reads the release folders of pyramid-flow-sd3 as they are downloaded (diffusion_transformer_384p/ or
_768p/, causal_video_vae/) and writes the checkpoints sample.py and train.py load; --check runs the
release's tiny fixtures through dit.py and vae.py and prints the largest difference from the
release's own outputs. App. B: the MM-DiT of SD3 Medium, the causal VAE.
"""
import json
import os
import sys

import torch
from einops import rearrange

import dit
from common import fail


# ---- the MM-DiT (release-mmdit)
# The release's (and diffusers SD3's) MM-DiT constructor arguments: those that set no weight or
# that this converter requires to have one value (checked in dit_config_of).
RELEASE_FIXED = dict(qk_norm="rms_norm", pos_embed_type="sincos", temp_pos_embed_type="rope", add_temp_pos_embed=True,
                     interp_condition_pos=True, use_t5_mask=True)
IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "use_gradient_checkpointing", "use_flash_attn",
           "gradient_checkpointing_ratio", "max_num_frames", "out_channels", "dual_attention_layers",
           "use_temporal_causal", "sample_size", "pos_embed_max_size"}


def dit_config_of(rc: dict, what: str, sd3: bool = False) -> dit.DiTConfig:
    """dit.DiTConfig of a release (or diffusers SD3) MM-DiT config.json; one line for what it cannot hold."""
    known = set(RELEASE_FIXED) | IGNORED | {"patch_size", "in_channels", "num_layers", "attention_head_dim",
                                            "num_attention_heads", "caption_projection_dim", "pooled_projection_dim",
                                            "joint_attention_dim", "qk_norm"}
    for key in rc:
        if key not in known:
            fail(f"{what}: unknown config key {key!r}")
    for key, value in ({} if sd3 else RELEASE_FIXED).items():
        if rc.get(key, value) != value:
            fail(f"{what}: {key}={rc[key]!r} is not the release's layout ({value!r}); this converter reads that one")
    if rc.get("dual_attention_layers"):
        fail(f"{what}: dual attention layers (SD3.5) are not an MM-DiT of this repository")
    try:
        p, heads, head_dim = rc["patch_size"], rc["num_attention_heads"], rc["attention_head_dim"]
        width, table = heads * head_dim, rc.get("pos_embed_max_size", 192)
        if rc.get("caption_projection_dim", width) != width:
            fail(f"{what}: caption_projection_dim {rc['caption_projection_dim']} differs from the width {width}")
        return dit.DiTConfig(
            in_channels=rc["in_channels"], patch_size=p, width=width, depth=rc["num_layers"], heads=heads,
            text_dim=rc["joint_attention_dim"], pooled_dim=rc["pooled_projection_dim"], norm_eps=1e-6,
            causal=rc.get("use_temporal_causal", True), history_time="current", time_input="release",
            # the table spaces sample_size / p tokens over its N rows (SD3's base size)
            pos_table=table, pos_spacing=(rc.get("sample_size", 128) // p) / table, qk_norm_eps=1e-6 if sd3 else 1e-5)
    except KeyError as e:
        fail(f"{what}: config.json lacks {e.args[0]!r}")


def mmdit_state(sd: dict, cfg: dit.DiTConfig, what: str, fill_qk_norm: bool = False) -> dict:
    """This repo's MMDiT state dict from the release's (or diffusers SD3's) key names. Every key is
    used once: an unknown or a missing one is a one-line error naming it. fill_qk_norm: q/k norm
    scales absent (SD3 Medium has none) start at 1, as a newly added RMSNorm does in the release."""
    sd, out = dict(sd), {}

    def take(key):
        if key not in sd:
            if fill_qk_norm and ".norm_" in key:
                return torch.ones(cfg.width // cfg.heads)
            fail(f"{what}: missing key {key}")
        return sd.pop(key).float()

    def halves_swapped(x):  # the release's (scale, shift) -> our (shift, scale)
        return torch.cat(x.chunk(2)[::-1])

    def linear(ours, theirs, f=lambda x: x):
        out[ours + ".weight"], out[ours + ".bias"] = f(take(theirs + ".weight")), f(take(theirs + ".bias"))

    table = take("pos_embed.pos_embed")[0]                                     # [N*N, D]
    N = cfg.pos_table
    ours = dit.table_embedding(N, N, (N, N), cfg) if table.shape[0] == N * N else None
    if ours is None or ours.shape != table.shape or (ours - table).abs().max() > 1e-4:
        fail(f"{what}: pos_embed.pos_embed is not the sin-cos table this layout computes")
    out["x_embedder.weight"] = take("pos_embed.proj.weight").flatten(1)     # [D, C*p*p], (c p1 p2) as ours
    out["x_embedder.bias"] = take("pos_embed.proj.bias")
    linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    linear("y_embedder.0", "time_text_embed.text_embedder.linear_1")
    linear("y_embedder.2", "time_text_embed.text_embedder.linear_2")
    linear("context_embedder", "context_embedder")
    for i in range(cfg.depth):
        b, r, last = f"blocks.{i}.", f"transformer_blocks.{i}.", i == cfg.depth - 1
        linear(b + "img_adaLN_modulation.1", r + "norm1.linear")
        linear(b + "txt_adaLN_modulation.1", r + "norm1_context.linear", halves_swapped if last else lambda x: x)
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for part in ("weight", "bias"):  # q, k, v stacked: our "(three h d)"
                out[f"{b}{stream}_qkv.{part}"] = torch.cat([take(f"{r}attn.{n}.{part}") for n in names])
        for ours_norm, theirs_norm in (("img_q", "q"), ("img_k", "k"), ("txt_q", "add_q"), ("txt_k", "add_k")):
            out[f"{b}{ours_norm}_norm.weight"] = take(f"{r}attn.norm_{theirs_norm}.weight")
        linear(b + "img_proj", r + "attn.to_out.0")
        linear(b + "img_mlp.0", r + "ff.net.0.proj")
        linear(b + "img_mlp.2", r + "ff.net.2")
        if not last:
            linear(b + "txt_proj", r + "attn.to_add_out")
            linear(b + "txt_mlp.0", r + "ff_context.net.0.proj")
            linear(b + "txt_mlp.2", r + "ff_context.net.2")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", halves_swapped)
    # rows (p1 p2 c) -> our (c p1 p2), and negated: the release's velocity points from data to noise
    p, C = cfg.patch_size, cfg.in_channels
    linear("final_layer.linear", "proj_out", lambda x: -rearrange(x, "(p1 p2 c) ... -> (c p1 p2) ...", p1=p, p2=p, c=C))
    if sd:
        fail(f"{what}: unknown key {next(iter(sd))}" + (f" (and {len(sd) - 1} more)" if len(sd) > 1 else ""))
    model_keys = set(dit.MMDiT(cfg).state_dict())
    if set(out) != model_keys:  # a mapping slip of this file, not of the input
        fail(f"{what}: the mapped keys differ from dit.MMDiT's: {sorted(set(out) ^ model_keys)[:3]}")
    return out


def mmdit_parity(fixture: dict) -> float:
    """Largest absolute difference between dit.py with the converted weights and the release's
    velocities stored in `fixture` (its config, state dict, text and cases)."""
    cfg = dit_config_of(fixture["mmdit/config"], "fixture mmdit/config")
    net = dit.MMDiT(cfg).eval()
    net.load_state_dict(mmdit_state(fixture["mmdit/state_dict"], cfg, "fixture mmdit/state_dict"))
    # t in paper notation, in float64 so that 1000 (1 - t) is the release's input exactly
    t = 1 - fixture["mmdit/timestep"].double() / 1000
    cases = sorted({k.split("/")[1] for k in fixture if k.endswith("/velocity")})
    if not cases:
        fail("the fixture has no mmdit/<case>/velocity")
    err = 0.0
    with torch.no_grad():
        for case in cases:
            # the release's chunks [B, C, T, h, w] -> our frames [B, C, h, w], oldest first
            frames = [x for chunk in fixture[f"mmdit/{case}/frames"] for x in chunk.float().unbind(2)]
            v = net(frames, fixture["mmdit/text"].float(), fixture["mmdit/text_mask"].bool(),
                    fixture["mmdit/pooled"].float(), t)
            err = max(err, (v + fixture[f"mmdit/{case}/velocity"][:, :, 0]).abs().max().item())  # opposite signs
    return err


def read_weights(folder: str, what: str) -> dict:
    """A diffusers folder's state dict: safetensors (one file or shards with an index) or .bin."""
    names = sorted(os.listdir(folder))
    st = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.endswith(".bin")]
    if not st and not bins:
        fail(f"{what}: no .safetensors or .bin weights in {folder}")
    sd = {}
    for name in st or bins:
        path = os.path.join(folder, name)
        try:
            if st:
                from safetensors.torch import load_file
                sd.update(load_file(path))
            else:
                sd.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
            fail(f"{what}: cannot read {path} ({type(e).__name__})")
    return sd


def read_config(folder: str, what: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        fail(f"{what}: no config.json in {folder}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{what}: {path} is not JSON ({e})")


# ---- the causal VAE (release-vae)
def convert_vae_folder(folder):
    """(vae_config_dict, state_dict) of this repo's vae.CausalVAE from a release causal_video_vae/ folder."""
    raise NotImplementedError("release-vae: the causal VAE's conversion")


def vae_parity(fixture: dict) -> float:
    """Largest absolute difference between vae.py and the release's outputs stored in `fixture`."""
    raise NotImplementedError("release-vae: the causal VAE's parity")


# ---- command line (release-mmdit)
def main(argv):
    fail("convert.py: not written yet")


if __name__ == "__main__":
    main(sys.argv[1:])
