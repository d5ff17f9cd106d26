"""The authors' released weights (and SD3-Medium's) in this repository's checkpoints, and the parity check.

Reads the release folders of pyramid-flow-sd3 as they are downloaded (diffusion_transformer_384p/ or
_768p/, causal_video_vae/) and writes the checkpoints sample.py and train.py load; --check runs the
release's tiny fixtures through dit.py and vae.py and prints the largest difference from the
release's own outputs. App. B: the MM-DiT of SD3 Medium, the causal VAE.
"""
import dataclasses
import json
import os
import sys

import torch
from einops import rearrange

import config
import dit
import vae
from common import boolean, check_writable_dir, fail, key_values, save_torch, wants_help


# ---- the MM-DiT (release-mmdit)
# The release's (and diffusers SD3's) MM-DiT constructor arguments: those that set no weight or
# that this converter requires to have one value (checked in dit_config_of).
RELEASE_FIXED = dict(qk_norm="rms_norm", pos_embed_type="sincos", temp_pos_embed_type="rope", add_temp_pos_embed=True,
                     interp_condition_pos=True, use_t5_mask=True)
# the release constructor's defaults, for a config.json that omits a key
RELEASE_ABSENT = dict(pos_embed_type="rope", temp_pos_embed_type="sincos", add_temp_pos_embed=False,
                      interp_condition_pos=False, use_t5_mask=False, use_temporal_causal=False)
SD3_SAMPLE_SIZE = 128  # config.json's sample_size when absent: SD3's base latent size (1024 px / 8)
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
        if rc.get(key, RELEASE_ABSENT.get(key, value)) != value:
            fail(f"{what}: {key}={rc.get(key, RELEASE_ABSENT.get(key))!r} is not the release's layout ({value!r}); "
                 "this converter reads that one")
    if rc.get("dual_attention_layers"):
        fail(f"{what}: dual attention layers (SD3.5) are not an MM-DiT of this repository")
    try:
        p, heads, head_dim = rc["patch_size"], rc["num_attention_heads"], rc["attention_head_dim"]
        width, table = heads * head_dim, rc.get("pos_embed_max_size", dit.RELEASE_LAYOUT["pos_table"])
        if not table:  # diffusers then embeds each size anew, no table to crop
            fail(f"{what}: pos_embed_max_size={table!r}; this converter reads the stored-table layout")
        if rc.get("caption_projection_dim", width) != width:
            fail(f"{what}: caption_projection_dim {rc['caption_projection_dim']} differs from the width {width}")
        return dit.DiTConfig(
            in_channels=rc["in_channels"], patch_size=p, width=width, depth=rc["num_layers"], heads=heads,
            text_dim=rc["joint_attention_dim"], pooled_dim=rc["pooled_projection_dim"],
            causal=rc.get("use_temporal_causal", sd3), history_time="current",
            # the release's layout, its table spacing sample_size / p tokens over its N rows
            **dict(dit.RELEASE_LAYOUT, pos_table=table,
                   pos_spacing=(rc.get("sample_size", SD3_SAMPLE_SIZE) // p) / table))
    except KeyError as e:
        fail(f"{what}: config.json lacks {e.args[0]!r}")


def mmdit_state(sd: dict, cfg: dit.DiTConfig, what: str, sd3: bool = False) -> dict:
    """This repo's MMDiT state dict from the release's (or diffusers SD3's) key names. Every key is
    used once: an unknown or a missing one is a one-line error naming it. sd3: q/k norm scales
    absent (SD3 Medium has none) start at 1, as the release's newly added RMSNorms do, and the
    position table may be absent (it is computed, not learned)."""
    sd, out = dict(sd), {}

    def take(key):
        if key not in sd:
            if sd3 and ".norm_" in key:
                return torch.ones(cfg.width // cfg.heads)
            fail(f"{what}: missing key {key}")
        return sd.pop(key).float()

    def halves_swapped(x):  # the release's (scale, shift) -> our (shift, scale)
        return torch.cat(x.chunk(2)[::-1])

    def linear(ours, theirs, f=lambda x: x):
        out[ours + ".weight"], out[ours + ".bias"] = f(take(theirs + ".weight")), f(take(theirs + ".bias"))

    N, stored = cfg.pos_table, sd.get("pos_embed.pos_embed")
    ours = dit.table_embedding(N, N, (N, N), cfg)                               # [N*N, D]
    table = take("pos_embed.pos_embed")[0] if stored is not None or not sd3 else ours
    tol = 1e-4 if stored is None or stored.dtype == torch.float32 else 1e-2  # a bf16 copy is rounded
    if ours.shape != table.shape or (ours - table).abs().max() > tol:
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
        add = "added" if sd3 else "add"  # diffusers' SD3 names the text stream's q/k norms norm_added_*
        for ours_norm, theirs_norm in (("img_q", "q"), ("img_k", "k"), ("txt_q", f"{add}_q"), ("txt_k", f"{add}_k")):
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
    with torch.device("meta"):  # names and shapes alone: nothing allocated for a 2B model
        model = dit.MMDiT(cfg).state_dict()
    if set(out) != set(model):  # a mapping slip of this file, not of the input
        fail(f"{what}: the mapped keys differ from dit.MMDiT's: {sorted(set(out) ^ set(model))[:3]}")
    for key, x in out.items():
        if x.shape != model[key].shape:
            fail(f"{what}: {key} (ours) has shape {tuple(x.shape)}, its config.json needs {tuple(model[key].shape)}")
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
    if st:
        try:
            from safetensors.torch import load_file
        except ImportError:
            fail("reading .safetensors needs the safetensors package: pip install safetensors")
    for name in st or bins:
        path = os.path.join(folder, name)
        try:
            if st:
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
# The release's CausalVideoVAE constructor defaults: its config.json may leave any of them out.
VAE_DEFAULTS = dict(
    encoder_in_channels=3, encoder_out_channels=4, encoder_layers_per_block=(2, 2, 2, 2),
    encoder_down_block_types=("DownEncoderBlockCausal3D",) * 4, encoder_block_out_channels=(128, 256, 512, 512),
    encoder_spatial_down_sample=(True, True, True, False), encoder_temporal_down_sample=(True, True, True, False),
    encoder_act_fn="silu", encoder_norm_num_groups=32, encoder_double_z=True, encoder_type="causal_vae_conv",
    decoder_in_channels=4, decoder_out_channels=3, decoder_layers_per_block=(3, 3, 3, 3),
    decoder_up_block_types=("UpDecoderBlockCausal3D",) * 4, decoder_block_out_channels=(128, 256, 512, 512),
    decoder_spatial_up_sample=(True, True, True, False), decoder_temporal_up_sample=(True, True, True, False),
    decoder_act_fn="silu", decoder_norm_num_groups=32, decoder_type="causal_vae_conv", interpolate=False)
# set no weight and change no output (dropout, tiling sizes; the quant convs are always built)
VAE_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "encoder_block_dropout", "decoder_block_dropout",
               "sample_size", "scaling_factor", "add_post_quant_conv", "downsample_scale"}
# the release's names inside a block -> ours (the rest are the same: norm1, conv1.conv, ...)
VAE_RENAMES = [("conv_shortcut.conv.", "skip."), ("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."),
               ("to_v.", "v."), ("to_out.0.", "out.")]


def vae_config_of(rc: dict, what: str) -> vae.VAEConfig:
    """vae.VAEConfig (the release's layout options) of a release causal_video_vae/config.json."""
    for key in rc:
        if key not in VAE_DEFAULTS and key not in VAE_IGNORED:
            fail(f"{what}: unknown config key {key!r}")
    rc = {k: tuple(v) if isinstance(v, list) else v for k, v in {**VAE_DEFAULTS, **rc}.items()}
    w, n = rc["encoder_block_out_channels"], len(rc["encoder_block_out_channels"])
    same = [("decoder_block_out_channels", w), ("decoder_in_channels", rc["encoder_out_channels"]),
            ("decoder_norm_num_groups", rc["encoder_norm_num_groups"]), ("encoder_in_channels", 3),
            ("decoder_out_channels", 3), ("encoder_act_fn", "silu"), ("decoder_act_fn", "silu"),
            ("encoder_double_z", True), ("interpolate", False), ("encoder_type", "causal_vae_conv"),
            ("decoder_type", "causal_vae_conv"), ("encoder_down_block_types", ("DownEncoderBlockCausal3D",) * n),
            ("decoder_up_block_types", ("UpDecoderBlockCausal3D",) * n)]
    for key, value in same:
        if rc[key] != value:
            fail(f"{what}: {key}={rc[key]!r}; this converter reads the release's layout ({value!r})")
    space, time = rc["encoder_spatial_down_sample"], rc["encoder_temporal_down_sample"]
    for key in ("encoder_spatial_down_sample", "encoder_temporal_down_sample", "encoder_layers_per_block",
                "decoder_spatial_up_sample", "decoder_temporal_up_sample", "decoder_layers_per_block"):
        if len(rc[key]) != n:
            fail(f"{what}: {key} has {len(rc[key])} entries for {n} levels")
    # encoder level i resamples after its blocks; decoder up-block j undoes encoder level n-2-j's
    for flags, up in ((space, "decoder_spatial_up_sample"), (time, "decoder_temporal_up_sample")):
        if flags[-1] or tuple(rc[up]) != tuple(reversed(flags[:-1])) + (False,):
            fail(f"{what}: {up}={rc[up]!r} does not undo the encoder's {flags!r} level by level")
    return vae.VAEConfig(
        latent_channels=rc["encoder_out_channels"], widths=w, spatial_factor=2 ** sum(space),
        temporal_factor=2 ** sum(time), enc_blocks=rc["encoder_layers_per_block"],
        dec_blocks=tuple(reversed(rc["decoder_layers_per_block"])),  # ours per level, top level first
        norm_groups=rc["encoder_norm_num_groups"], kernel=3, time_padding="zeros", norm_eps=1e-6,
        mid_attention=True, resampling="separate", spatial_steps=space[:-1], temporal_steps=time[:-1],
        quant_convs=True)


def vae_prefixes(cfg: vae.VAEConfig) -> dict:
    """Our module prefix of each release module prefix that holds weights."""
    names = {"quant_conv.": "encoder.quant.", "post_quant_conv.": "decoder.post_quant."}
    for part in ("encoder", "decoder"):
        names.update({f"{part}.{theirs}.": f"{part}.{ours}." for theirs, ours in (
            ("conv_in", "conv_in"), ("conv_norm_out", "norm_out"), ("conv_out", "conv_out"),
            ("mid_block.resnets.0", "mid.0"), ("mid_block.attentions.0", "mid.1"), ("mid_block.resnets.1", "mid.2"))})
    n, steps = len(cfg.widths), vae._resampling(cfg) + [(False, False)]
    enc, dec = vae._per_level(cfg.enc_blocks, n), vae._per_level(cfg.dec_blocks, n)
    # the release's encoder down-block i is our level i, resampling by steps[i] after its blocks;
    # its decoder up-block j is our level n-1-j, undoing steps[n-2-j] (j = n-1: index -1, none)
    for part, way, levels in (("encoder", "down", [(i, enc[i], steps[i]) for i in range(n)]),
                              ("decoder", "up", [(j, dec[n - 1 - j], steps[n - 2 - j]) for j in range(n)])):
        k = 0
        for j, blocks, step in levels:
            theirs = f"{part}.{way}_blocks.{j}."
            for r in range(blocks):
                names[f"{theirs}resnets.{r}."], k = f"{part}.blocks.{k}.", k + 1
            if any(step):
                names[f"{theirs}{way}samplers.0.conv."] = f"{part}.blocks.{k}.space_conv."
                names[f"{theirs}temporal_{way}samplers.0.conv."], k = f"{part}.blocks.{k}.time_conv.", k + 1
    return names


def vae_state(sd: dict, cfg: vae.VAEConfig, what: str, stats=((0.0, 1.0), (0.0, 1.0))) -> dict:
    """This repo's CausalVAE state dict from the release's key names, its latent normalisation set to
    `stats` ((shift, scale) of frame 0, of the later frames). Every key is used once: an unknown,
    missing or misshapen one is a one-line error naming it (the release's name)."""
    prefixes = vae_prefixes(cfg)
    ours_of = {}
    for key in sd:
        p = max((p for p in prefixes if key.startswith(p)), key=len, default=None)
        rest = key[len(p):] if p else ""
        rest = next((new + rest[len(old):] for old, new in VAE_RENAMES if rest.startswith(old)), rest)
        ours_of[key] = prefixes[p] + rest if p else None
    with torch.device("meta"):  # names and shapes alone
        model = vae.CausalVAE(cfg).state_dict()
    for key, ours in ours_of.items():
        if ours not in model:
            fail(f"{what}: unknown key {key}")
        if sd[key].shape != model[ours].shape:
            fail(f"{what}: {key} has shape {tuple(sd[key].shape)}, this config needs {tuple(model[ours].shape)}")
    out = {ours: sd[key].float() for key, ours in ours_of.items()}
    theirs_of = {v: k for k, v in prefixes.items()}
    for ours in model:
        if ours not in out and ours not in ("latent_shift", "latent_scale"):
            p = max((p for p in theirs_of if ours.startswith(p)), key=len, default="")
            rest = next((old + ours[len(p) + len(new):] for old, new in VAE_RENAMES
                         if ours[len(p):].startswith(new)), ours[len(p):])
            fail(f"{what}: missing key {theirs_of.get(p, '') + rest}")
    stats = torch.tensor(stats, dtype=torch.float32)  # [frame 0 / later, shift / scale]
    out["latent_shift"] = stats[:, 0:1].expand(2, cfg.latent_channels).clone()
    out["latent_scale"] = stats[:, 1:2].expand(2, cfg.latent_channels).clone()
    return out


def convert_vae_folder(folder, dit_model="mmdit"):
    """(vae_config_dict, state_dict) of this repo's vae.CausalVAE from a release causal_video_vae/
    folder (config.json and weights). The latent normalisation is the release pipeline's for
    `dit_model` ("mmdit": pyramid-flow-sd3, "flux": pyramid-flow-miniflux), so vae.normalize(z)
    is what the release's DiT reads, and a latent the release extracted (a raw sample of the
    posterior, unnormalised) becomes one of ours by vae.normalize."""
    what = f"VAE folder {folder}"
    rc = read_config(folder, what)
    if rc.get("_class_name", "CausalVideoVAE") != "CausalVideoVAE":
        fail(f"{what}: config.json is a {rc['_class_name']}, not the release's CausalVideoVAE")
    cfg = vae_config_of(rc, what)
    stats = vae.RELEASE_LATENT_STATS[dit_model]
    return dataclasses.asdict(cfg), vae_state(read_weights(folder, what), cfg, what, stats)


def vae_parity(fixture: dict) -> float:
    """Largest absolute difference between vae.py and the release's outputs stored in `fixture`: the
    posterior's mean and log-variance of vae/video (encoded in one call and in chunks of one latent
    frame) and the decoding of vae/latent_mean (all raw, before the pipeline's normalisation)."""
    cfg = vae_config_of(fixture["vae/config"], "fixture vae/config")
    net = vae.CausalVAE(cfg).eval()
    net.load_state_dict(vae_state(fixture["vae/state_dict"], cfg, "fixture vae/state_dict"))
    err = 0.0
    with torch.no_grad():
        for chunk in (None, 1):
            mean, logvar = net.posterior(fixture["vae/video"].float(), chunk=chunk)
            err = max(err, (mean - fixture["vae/latent_mean"]).abs().max().item(),
                      (logvar - fixture["vae/latent_logvar"]).abs().max().item())
        decoded = net.decode(fixture["vae/latent_mean"].float())
    return max(err, (decoded - fixture["vae/decoded"]).abs().max().item())


# ---- command line (release-mmdit)
RESOLUTIONS = {"384p": 2, "768p": 3}  # the release's DiT folders -> the full recipe's phase of that size
OPTIONS = dict(  # --key=value: (default, meaning)
    release=("", "the release folder as downloaded (pyramid-flow-sd3): its DiT folders and VAE"),
    sd3=("", "a diffusers SD3 folder (or its transformer/): the paper-size MM-DiT for train.py --init_from"),
    check=("", "a release fixture (../shared/fixtures/release_tiny.pt): print the parity of dit.py and vae.py"),
    out=("release", "the folder the checkpoints go to: dit_384p.pt, dit_768p.pt, vae.pt, sd3_init.pt"),
    overwrite=("false", "replace checkpoints that already exist in --out"),
)


def run_settings(phase: int, **changes) -> dict:
    """The train.py settings a converted checkpoint implies: the full recipe's phase of its size
    (384p: 384x640, 121 frames; 768p: 768x1280, 241), the release's layout and history modulation,
    and sample.py's defaults the release recommends (20/20/20 steps, guidance 7; later 10/10/10, 5)."""
    settings = config.preset_settings("full", str(phase)) | dict(preset="full", phase=phase, layout="release",
                                                                  history_time="current")
    return dataclasses.asdict(dataclasses.replace(config.Config(), **settings, **changes))


def dit_checkpoint(cfg: dit.DiTConfig, state: dict, settings: dict, vae_config=None) -> dict:
    """A checkpoint as train.py's full recipe writes it (sample.py --ckpt, train.py --init_from);
    vae_config: the layout of the VAE whose latents it takes (sample.py checks a --vae_ckpt by it)."""
    weights = {"net.dit." + k: v.contiguous() for k, v in state.items()}
    return dict(kind="pyramid-flow", task="video", config=settings, dit_config=dataclasses.asdict(cfg),
                model=weights, ema=weights, vae=None, vae_config=vae_config, text_features=True, step=0)


def convert_dit_folder(folder: str):
    """(DiTConfig, state dict) of a release diffusion_transformer_* folder."""
    cfg = dit_config_of(read_config(folder, folder), f"{folder}/config.json")
    return cfg, mmdit_state(read_weights(folder, folder), cfg, folder)


def convert_sd3(folder: str):
    """(DiTConfig, state dict) of a diffusers SD3 transformer, as the release starts from it: its
    layout (SD3's own table, time input and velocity sign), history modulated at the current time,
    q/k norm scales 1 where SD3 Medium has none, and the release's q/k eps."""
    if os.path.isdir(os.path.join(folder, "transformer")):
        folder = os.path.join(folder, "transformer")
    cfg = dit_config_of(read_config(folder, folder), f"{folder}/config.json", sd3=True)
    return cfg, mmdit_state(read_weights(folder, folder), cfg, folder, sd3=True)


def check(path: str):
    if not os.path.isfile(path):
        fail(f"no fixture at {path}")
    try:
        fixture = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets one line
        fail(f"{path} is not a readable fixture ({type(e).__name__})")
    missing = [k for k in ("mmdit/config", "mmdit/state_dict", "vae/config", "vae/state_dict") if k not in fixture]
    if missing:
        fail(f"{path} is not a release fixture (no {missing[0]}; layout: ../shared/fixtures/README.md)")
    print(f"release parity: mmdit max abs err {mmdit_parity(fixture):.2e}, vae max abs err {vae_parity(fixture):.2e}")


def main(argv):
    if wants_help(argv):
        print(__doc__.strip() + "\n\noptions (--key=value):")
        for key, (default, meaning) in OPTIONS.items():
            print(f"  --{key:<10} {meaning}" + (f" [{default}]" if default else ""))
        return
    o = {key: default for key, (default, _) in OPTIONS.items()}
    for key, value in key_values(argv, "python convert.py --help lists the options"):
        if key not in o:
            fail(f"unknown option --{key}; python convert.py --help lists the options")
        o[key] = value
    if sum(bool(o[k]) for k in ("release", "sd3", "check")) != 1:
        fail("give one of --release=DIR, --sd3=DIR and --check=FIXTURE (python convert.py --help)")
    if o["check"]:
        return check(o["check"])
    source = o["release"] or o["sd3"]
    if not os.path.isdir(source):
        fail(f"no folder at {source}")
    # every output is named and refused before any work
    if o["release"]:
        dits = [r for r in RESOLUTIONS if os.path.isdir(os.path.join(source, f"diffusion_transformer_{r}"))]
        if not dits:
            fail(f"{source} has no diffusion_transformer_384p/ or _768p/ (the release folder as downloaded)")
        has_vae = os.path.isdir(os.path.join(source, "causal_video_vae"))
        outs = [f"dit_{r}.pt" for r in dits] + (["vae.pt"] if has_vae else [])
    else:
        outs = ["sd3_init.pt"]
    check_writable_dir("out", o["out"])
    for name in outs:
        if os.path.exists(os.path.join(o["out"], name)) and not boolean("overwrite", o["overwrite"]):
            fail(f"{os.path.join(o['out'], name)} exists; pass --overwrite=true to replace it")
    os.makedirs(o["out"], exist_ok=True)
    out = lambda name: os.path.join(o["out"], name)  # noqa: E731
    if o["sd3"]:
        cfg, state = convert_sd3(source)
        save_torch(out("sd3_init.pt"), dit_checkpoint(cfg, state, run_settings(1)))
        print(f"wrote {out('sd3_init.pt')}: train with python train.py --preset=full --layout=release "
              f"--history_time=current --init_from={out('sd3_init.pt')}")
        return
    vae_path = os.path.abspath(out("vae.pt")) if has_vae else ""
    if has_vae:
        vae_cfg, vae_weights = convert_vae_folder(os.path.join(source, "causal_video_vae"))
        save_torch(out("vae.pt"), dict(kind="causal-vae", config=vae_cfg, model=vae_weights))
        print(f"wrote {out('vae.pt')}")
    for r in dits:
        cfg, state = convert_dit_folder(os.path.join(source, f"diffusion_transformer_{r}"))
        settings = run_settings(RESOLUTIONS[r], text_encoder="sd3:" + os.path.abspath(source), vae_ckpt=vae_path)
        save_torch(out(f"dit_{r}.pt"), dit_checkpoint(cfg, state, settings, vae_cfg if has_vae else None))
        print(f"wrote {out(f'dit_{r}.pt')}")


if __name__ == "__main__":
    main(sys.argv[1:])
