"""convert.py and the MM-DiT half of the authors' release: numerical parity of dit.py (and vae.py)
with the release's own outputs on two tiny fixtures, the key map's one-line errors, SD3 (diffusers'
SD3Transformer2DModel) into this repo's MM-DiT, and the whole path on the CPU: a release folder
converted into checkpoints and sampled by sample.py with the release's preset.
Legend: video [B, C, T, H, W], one latent frame [B, C, h, w], tokens [B, L, D]."""
import dataclasses
import json
import math
import os
import re

import pytest
import torch

import config
import convert
import dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "fixtures", "release_tiny.pt")
OURS = os.path.join(ROOT, "tests", "fixtures", "release_tiny2.pt")  # another tiny configuration, both halves
# release-vae's second fixture: 3 latent channels, as OURS's MM-DiT takes
VAE_FIXTURE = os.path.join(ROOT, "tests", "fixtures", "release_vae_tiny2.pt")


def randomize(module, seed):
    """The fixtures' draw: norm scales 1 + 0.1 z, biases 0.05 z, other weights N(0, 1) / sqrt(fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * z if "norm" in name and p.dim() == 1 else 0.05 * z if name.endswith("bias")
                    else z / math.sqrt(p[0].numel()))


@pytest.mark.parametrize("path", [SHARED, OURS], ids=["shared", "ours"])
def test_check_prints_both_parities_within_1e4(path, capsys):
    if not os.path.isfile(path):
        pytest.skip(f"no fixture at {path} (the shared fixtures sit beside the repository)")
    convert.main([f"--check={path}"])
    out = capsys.readouterr().out
    m = re.fullmatch(r"release parity: mmdit max abs err (\S+), vae max abs err (\S+)\n", out)
    assert m, out
    assert float(m[1]) <= 1e-4 and float(m[2]) <= 1e-4, out


def test_every_key_is_accounted_for():
    fx = torch.load(OURS, weights_only=True)
    cfg = convert.dit_config_of(fx["mmdit/config"], "config")
    sd = fx["mmdit/state_dict"]
    with pytest.raises(SystemExit, match="unknown key transformer_blocks.0.attn.extra.weight"):
        convert.mmdit_state(sd | {"transformer_blocks.0.attn.extra.weight": torch.zeros(1)}, cfg, "w")
    with pytest.raises(SystemExit, match="missing key transformer_blocks.1.attn.norm_add_k.weight"):
        convert.mmdit_state({k: v for k, v in sd.items() if "1.attn.norm_add_k" not in k}, cfg, "w")
    with pytest.raises(SystemExit, match="unknown config key 'mystery'"):
        convert.dit_config_of(fx["mmdit/config"] | {"mystery": 1}, "config")
    with pytest.raises(SystemExit, match="use_t5_mask=False"):
        convert.dit_config_of(fx["mmdit/config"] | {"use_t5_mask": False}, "config")
    # a plausible slip (the final layer's halves in the release's order) moves the output by far more than 1e-4
    bad = dict(fx, **{"mmdit/state_dict": sd | {"norm_out.linear.weight": sd["norm_out.linear.weight"].flip(0)}})
    assert convert.mmdit_parity(bad) > 1e-2


def test_converted_checkpoint_fits_the_full_recipe_init_from():
    """SD3 Medium's config.json converts to the DiTConfig that train.py builds for --preset=full
    --layout=release --history_time=current (train.start_from compares them)."""
    sd3_medium = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                      num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                      pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
    ours = convert.dit_config_of(sd3_medium, "sd3", sd3=True)
    settings = config.preset_settings("full", "1") | dict(layout="release", history_time="current")
    run_cfg = config.dit_config(config.Config(**settings), in_channels=16, text_dim=4096, pooled_dim=2048)
    drop = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k != "grad_checkpointing"}  # noqa: E731
    assert drop(ours) == drop(run_cfg)


def test_sd3_matches_diffusers_on_one_image(tmp_path):
    """A tiny random SD3Transformer2DModel, converted: on one image at full resolution with no
    history, our MM-DiT gives diffusers' output (opposite sign: paper velocity, t = 1 - sigma)."""
    diffusers = pytest.importorskip("diffusers")
    kw = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
              joint_attention_dim=24, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
              pos_embed_max_size=48)
    ref = diffusers.SD3Transformer2DModel(**kw, qk_norm="rms_norm").eval()
    randomize(ref, 0)
    ref.save_pretrained(tmp_path / "sd3" / "transformer")
    cfg, state = convert.convert_sd3(str(tmp_path / "sd3"))
    # diffusers' SD3 normalises q and k with eps 1e-6; the converted config takes the release's 1e-5
    net = dit.MMDiT(dataclasses.replace(cfg, qk_norm_eps=1e-6)).eval()
    net.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 7, 24, generator=g)
    pooled, sigma = torch.randn(2, 12, generator=g), torch.tensor([0.9, 0.3], dtype=torch.float64)
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                       timestep=(1000 * sigma).float()).sample
        v = net([x], text, torch.ones(2, 7, dtype=torch.bool), pooled, 1 - sigma)
    assert expected.abs().mean() > 0.1
    assert (v + expected).abs().max() < 1e-4
    # SD3 Medium has no q/k norms: they start at 1, as the release adds them
    plain = diffusers.SD3Transformer2DModel(**kw).eval()
    plain.save_pretrained(tmp_path / "medium")
    _, state = convert.convert_sd3(str(tmp_path / "medium"))
    assert all(torch.equal(v, torch.ones(8)) for k, v in state.items() if "q_norm" in k or "k_norm" in k)


def release_folder(path, tiny_text):
    """A release folder as downloaded, from the fixtures: diffusion_transformer_384p/,
    causal_video_vae/ (config.json + safetensors) and tiny random text encoders in SD3's layout."""
    from safetensors.torch import save_file
    mm, vae = torch.load(OURS, weights_only=True), torch.load(VAE_FIXTURE, weights_only=True)
    for sub, cls, cfg, sd in (("diffusion_transformer_384p", "PyramidDiffusionMMDiT", mm["mmdit/config"],
                               mm["mmdit/state_dict"]),
                              ("causal_video_vae", "CausalVideoVAE", vae["vae/config"], vae["vae/state_dict"])):
        os.makedirs(path / sub)
        (path / sub / "config.json").write_text(json.dumps(dict(cfg, _class_name=cls)))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / sub / "diffusion_pytorch_model.safetensors"))
    tok, t5, clip_l, clip_g = tiny_text
    for sub, model in (("", clip_l), ("_2", clip_g), ("_3", t5)):
        model.save_pretrained(path / f"text_encoder{sub}")
        tok.save_pretrained(path / f"tokenizer{sub}")
    return mm


def test_release_folder_end_to_end(tmp_path):
    """convert.py --release=DIR writes dit_384p.pt and vae.pt; the loaded checkpoint reproduces the
    release's velocities; sample.py --preset=release (20/20/20 steps, guidance 7, the negative
    prompt) makes a video from them on the CPU; nothing is overwritten without --overwrite."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("all_minilm_l6_v2")
    import sample
    import text_encoders
    tok = transformers.AutoTokenizer.from_pretrained(text_encoders.minilm_folder(str(tmp_path / "minilm")))
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=tok.vocab_size, d_model=28, d_kv=8, d_ff=32,
                                                           num_layers=1, num_heads=2))

    def clip(dim):  # the two pooled vectors: 8 + 12 = the fixture's 20
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, projection_dim=dim, max_position_embeddings=text_encoders.CLIP_MAX_LENGTH,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id))
    fx = release_folder(tmp_path / "pyramid-flow-sd3", (tok, t5, clip(8), clip(12)))
    out = tmp_path / "converted"
    convert.main([f"--release={tmp_path / 'pyramid-flow-sd3'}", f"--out={out}"])
    assert sorted(os.listdir(out)) == ["dit_384p.pt", "vae.pt"]
    with pytest.raises(SystemExit, match="dit_384p.pt exists; pass --overwrite=true"):
        convert.main([f"--release={tmp_path / 'pyramid-flow-sd3'}", f"--out={out}"])

    ckpt = str(out / "dit_384p.pt")
    net, cfg, vae = sample.load(ckpt)
    assert (cfg["size"], cfg["frame_width"], cfg["layout"], cfg["history_time"]) == (384, 640, "release", "current")
    frames = [x for chunk in fx["mmdit/full_stage_with_history/frames"] for x in chunk.unbind(2)]  # [B, C, h, w]
    t = 1 - fx["mmdit/timestep"].double() / 1000
    with torch.no_grad():
        v = net.dit(frames, fx["mmdit/text"], fx["mmdit/text_mask"].bool(), fx["mmdit/pooled"], t)
    assert (v + fx["mmdit/full_stage_with_history/velocity"][:, :, 0]).abs().max() < 1e-4

    # a small frame for the CPU: 64x96 pixels are 16x24 latents of this VAE (4x), 3 latent frames of 5
    ck = torch.load(ckpt, weights_only=True)
    ck["config"].update(size=64, frame_width=96)
    torch.save(ck, ckpt)
    sample.main([f"--ckpt={ckpt}", "--preset=release", "--prompt=a red circle", "--frames=5", f"--out={out / 'a.gif'}"])
    import imageio.v3 as iio
    video = iio.imread(out / "a.gif")
    assert video.shape[:3] == (5, 64, 96) and video.std() > 0
