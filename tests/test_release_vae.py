"""The authors' causal VAE in vae.py (convert.py's VAE section): numerical parity with the release's
own outputs on two tiny random configurations, one-line key errors, converted folders loading with
common.load_vae, and chunked encoding (equal to one call, memory not growing with clip length).
CPU, fp32."""
import dataclasses
import json
import os

import pytest
import torch

import common
import convert
from vae import RELEASE_LATENT_STATS, VAE_SIZES, CausalConv3d, CausalVAE

HERE = os.path.dirname(os.path.abspath(__file__))


def shared_fixture():
    """The release's own fixture: ../shared/fixtures from the repository (../../shared from a git
    worktree in a folder beside it), or where RELEASE_FIXTURE says."""
    if os.environ.get("RELEASE_FIXTURE"):
        return os.environ["RELEASE_FIXTURE"]
    for up in ([".."], ["..", ".."]):
        path = os.path.join(HERE, "..", *up, "shared", "fixtures", "release_tiny.pt")
        if os.path.exists(path):
            return path
    return path


SHARED = shared_fixture()
# vae/ keys only: 3 levels (4, 8, 12), 2/1/1 encoder and 1/2/2 decoder blocks, 2 groups, 3 latent
# channels, space halved at levels 0 and 1, time at level 1 only (s=4, f=2), a batch of two 9x16x24 clips
OWN = os.path.join(HERE, "fixtures", "release_vae_tiny2.pt")
# the release's code reproduces itself to ~1e-6 here; a layout slip moves outputs by 0.1 or more
GOAL = 1e-4
# chunked vs one call: the same convolutions on shorter inputs, fp32 round-off of a few dozen
# layers on O(1) activations (measured: <= 1e-6); a wrong cache moves a frame by O(0.1)
ATOL = 1e-5


def load(path):
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent")
    return torch.load(path, weights_only=True)


def released(path):
    """vae.py's CausalVAE holding a fixture's release weights, and the fixture."""
    fx = load(path)
    cfg = convert.vae_config_of(fx["vae/config"], "fixture")
    net = CausalVAE(cfg).eval()
    net.load_state_dict(convert.vae_state(fx["vae/state_dict"], cfg, "fixture"))
    return net, fx


@pytest.mark.parametrize("path", [SHARED, OWN], ids=["shared", "own"])
def test_parity_with_the_release(path):
    err = convert.vae_parity(load(path))
    print(f"vae max abs err {err:.1e}")
    assert err <= GOAL


def test_parity_notices_a_layout_slip(monkeypatch):
    """The check is not vacuous: the repo's own front padding (replicated frames) instead of the
    release's zeros fails it by far."""
    fx = load(OWN)
    release_config = convert.vae_config_of
    monkeypatch.setattr(convert, "vae_config_of",
                        lambda rc, what: dataclasses.replace(release_config(rc, what), time_padding="replicate"))
    assert convert.vae_parity(fx) > 1e-2


def one_line_error(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_key_errors_are_one_line_naming_the_key():
    fx = load(OWN)
    cfg = convert.vae_config_of(fx["vae/config"], "fixture")
    sd = dict(fx["vae/state_dict"])
    missing = "decoder.up_blocks.1.resnets.1.conv2.conv.weight"
    del sd[missing]
    assert one_line_error(convert.vae_state, sd, cfg, "fixture").endswith(f"missing key {missing}")
    sd = {**fx["vae/state_dict"], "encoder.mid_block.attentions.1.to_q.weight": torch.zeros(12, 12)}
    assert "unknown key encoder.mid_block.attentions.1.to_q.weight" in one_line_error(
        convert.vae_state, sd, cfg, "fixture")
    sd = {**fx["vae/state_dict"], "quant_conv.conv.bias": torch.zeros(7)}
    assert "quant_conv.conv.bias has shape (7,)" in one_line_error(convert.vae_state, sd, cfg, "fixture")
    for bad in ({"encoder_layer_norm": True}, {"interpolate": True}, {"decoder_temporal_up_sample": [1, 1, 0]}):
        message = one_line_error(convert.vae_config_of, {**fx["vae/config"], **bad}, "fixture")
        assert next(iter(bad)) in message


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_converted_folder_loads_with_the_release_normalisation(tmp_path, fmt):
    """A causal_video_vae/ folder -> a checkpoint common.load_vae reads: the same posterior mean as
    the release, and vae.normalize is the release pipeline's (z - shift) / scale, frame 0 apart."""
    fx = load(OWN)
    folder = tmp_path / "causal_video_vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "CausalVideoVAE", **fx["vae/config"]}))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(fx["vae/state_dict"], str(folder / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(fx["vae/state_dict"], folder / "diffusion_pytorch_model.bin")
    config, state = convert.convert_vae_folder(str(folder))
    path = str(tmp_path / "vae.pt")
    common.save_torch(path, dict(kind="causal-vae", config=config, model=state))
    net = common.load_vae(path)
    with torch.no_grad():
        z = net.encode(fx["vae/video"])
    torch.testing.assert_close(z, fx["vae/latent_mean"], atol=GOAL, rtol=0)
    (s0, c0), (s1, c1) = RELEASE_LATENT_STATS["mmdit"]
    n = net.normalize(z)
    torch.testing.assert_close(n[:, :, :1], (z[:, :, :1] - s0) / c0)
    torch.testing.assert_close(n[:, :, 1:], (z[:, :, 1:] - s1) / c1)
    torch.testing.assert_close(net.denormalize(n), z)


def random_toy():
    torch.manual_seed(0)
    net = CausalVAE(VAE_SIZES["toy"]).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def clip(net, k, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 1 + net.cfg.temporal_factor * k, size, size, generator=g) * 2 - 1


@torch.no_grad()
@pytest.mark.parametrize("which", ["toy", "release-layout", "release-layout-f8"])
def test_chunked_encoding_and_decoding_equal_one_call(which):
    if which == "toy":
        net, x = random_toy(), None
    else:
        net, fx = released(OWN if which == "release-layout" else SHARED)
        x = fx["vae/video"]
    x = clip(net, 5) if x is None else x
    k = net.cfg.latent_frames(x.shape[2]) - 1
    mean, logvar = net.posterior(x)
    for chunk in sorted({1, 2, 3, k}):  # 3 leaves a shorter last chunk when k is not a multiple
        m, lv = net.posterior(x, chunk=chunk)
        torch.testing.assert_close(m, mean, atol=ATOL, rtol=0)
        torch.testing.assert_close(lv, logvar, atol=ATOL, rtol=0)
    torch.testing.assert_close(net.posterior(x)[0], mean, atol=0, rtol=0)  # no streaming state left behind
    decoded = net.decode(mean)  # and decoding in chunks, as sampling does
    for chunk in sorted({1, 2, k}):
        torch.testing.assert_close(net.decode(mean, chunk=chunk), decoded, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("which", ["toy", "release-layout"])
def test_chunked_encoding_memory_does_not_grow_with_the_clip(which):
    """Every layer of the encoder is a per-frame op or a causal conv; with chunks, no conv ever sees
    more than f*chunk + kernel - 1 frames, however long the clip (so activations are bounded)."""
    net = random_toy() if which == "toy" else released(OWN)[0]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
             for m in net.encoder.modules() if isinstance(m, CausalConv3d)]
    f, chunk = net.cfg.temporal_factor, 2
    longest = {}
    for k in (4, 16):
        seen.clear()
        net.encode(clip(net, k, size=8), chunk=chunk)
        longest[k] = max(seen)
        seen.clear()
        net.encode(clip(net, k, size=8))
        assert max(seen) == 1 + f * k  # one call: the whole clip at once
    for h in hooks:
        h.remove()
    assert longest[4] == longest[16] <= f * chunk


def test_a_241_frame_768p_clip_encodes_in_bounded_memory():
    """The release's VAE (paper size, on the meta device: shapes only) on 241 frames of 768x1280:
    in one call its largest activation is 56.5 GiB in bf16; 16 frames a call (extraction's
    chunk=2) keep it at 16/241 of that, whatever the length."""
    cfg = convert.vae_config_of({"encoder_out_channels": 16, "decoder_in_channels": 16}, "release")
    sizes, largest = [], {}
    with torch.device("meta"):
        net = CausalVAE(cfg)
        for m in net.encoder.modules():
            if not list(m.children()):  # every layer's output
                m.register_forward_hook(lambda m, args, out: sizes.append(out.numel()))
        for chunk in (None, 2):
            sizes.clear()
            z = net.encode(torch.empty(1, 3, 241, 768, 1280), chunk=chunk)
            assert z.shape == (1, 16, 31, 96, 160)
            largest[chunk] = max(sizes) * 2 / 2 ** 30  # GiB in bf16
    assert largest[None] > 56 and largest[2] <= largest[None] * 16 / 241 + 1e-6
