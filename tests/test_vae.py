"""Tests of vae.py: causality, shapes, chunked and tiled decoding, KL, normalisation, errors.
Tiny models on CPU in fp32; the paper size only on the meta device (shapes, no memory)."""
import pytest
import torch

from vae import (VAE_SIZES, CausalVAE, PatchDiscriminator, estimate_latent_stats, kl, psnr,
                 vae_training_loss)

ATOL = 1e-5  # fp32 round-off of a few dozen convs; a causality leak would be O(1)


def random_vae(name="toy", seed=0):
    """A VAE with random, non-trivial weights everywhere (GroupNorm affines too)."""
    torch.manual_seed(seed)
    vae = CausalVAE(VAE_SIZES[name]).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


def video(frames, size=16, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=g) * 2 - 1


@torch.no_grad()
def test_encoder_is_causal():
    vae, f, k = random_vae(), VAE_SIZES["toy"].temporal_factor, 3
    x = video(1 + f * k)
    z = vae.encode(x)
    for j in range(k):  # latent j spans pixel frames up to f*j: perturb everything after that
        x2 = x.clone()
        x2[:, :, f * j + 1:] += torch.randn_like(x2[:, :, f * j + 1:])
        z2 = vae.encode(x2)
        torch.testing.assert_close(z2[:, :, :j + 1], z[:, :, :j + 1], atol=ATOL, rtol=0)
        assert (z2[:, :, j + 1] - z[:, :, j + 1]).abs().max() > 1e-3  # the test is not vacuous


@torch.no_grad()
def test_decoder_is_causal():
    vae, f, k = random_vae(), VAE_SIZES["toy"].temporal_factor, 3
    z = torch.randn(1, VAE_SIZES["toy"].latent_channels, 1 + k, 4, 4)
    x = vae.decode(z)
    for j in range(k):
        z2 = z.clone()
        z2[:, :, j + 1:] += torch.randn_like(z2[:, :, j + 1:])
        x2 = vae.decode(z2)
        torch.testing.assert_close(x2[:, :, :f * j + 1], x[:, :, :f * j + 1], atol=ATOL, rtol=0)
        assert (x2[:, :, f * j + 1] - x[:, :, f * j + 1]).abs().max() > 1e-3


def test_paper_shapes():
    """1 + 8k frames <-> 1 + k latents of 16 channels at 8x8 spatial compression (meta device)."""
    cfg = VAE_SIZES["paper"]
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.latent_channels) == (8, 8, 16)
    with torch.device("meta"):
        vae = CausalVAE(cfg)
        for k in [0, 1, 2, 4]:
            x = torch.empty(2, 3, 1 + 8 * k, 64, 48)
            z = vae.encode(x)
            assert z.shape == (2, 16, 1 + k, 8, 6)
            assert vae.decode(z).shape == x.shape


@torch.no_grad()
def test_image_round_trip():
    """One frame is an image: one latent frame, one pixel frame, and it is latent 0 of any video
    that starts with that image (the replicate padding makes a still past look like no past)."""
    vae, cfg = random_vae(), VAE_SIZES["toy"]
    x = video(1 + 2 * cfg.temporal_factor)
    z_img = vae.encode(x[:, :, :1])
    s = cfg.spatial_factor
    assert z_img.shape == (1, cfg.latent_channels, 1, 16 // s, 16 // s)
    assert vae.decode(z_img).shape == (1, 3, 1, 16, 16)
    torch.testing.assert_close(vae.encode(x)[:, :, :1], z_img, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_decode_equals_full(chunk):
    vae = random_vae()
    z = torch.randn(2, VAE_SIZES["toy"].latent_channels, 5, 4, 4)
    full = vae.decode(z)
    torch.testing.assert_close(vae.decode(z, chunk=chunk), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(vae.decode(z), full, atol=0, rtol=0)  # no streaming state left behind


def test_tile_blending_is_exact_for_a_pointwise_decoder(monkeypatch):
    """With a decoder that looks at each latent pixel alone, tiles must reassemble exactly:
    this checks the placement and that the blending weights sum to one."""
    vae, s = random_vae(), VAE_SIZES["toy"].spatial_factor
    up = lambda z, chunk: torch.nn.functional.interpolate(z[:, :3], scale_factor=(1, s, s))  # noqa: E731
    monkeypatch.setattr(vae, "_decode_chunks", up)
    z = torch.randn(1, VAE_SIZES["toy"].latent_channels, 2, 11, 9)
    for tile, overlap in [(4, 2), (5, 1), (6, 0), (4, 3)]:
        torch.testing.assert_close(vae.decode(z, tile=tile, overlap=overlap), up(z, None), atol=1e-6, rtol=0)


@torch.no_grad()
def test_tiled_decode_is_close():
    """Tiling is approximate: a tile sees zero padding instead of its neighbours within the
    decoder's receptive field and has its own GroupNorm statistics. A random-init decoder is far
    rougher than a trained one: the measured relative L2 error is 0.12 here (0.27 without
    overlap), so 0.2 allows that and still catches a misplaced tile (error ~1)."""
    vae = random_vae()
    z = torch.randn(1, VAE_SIZES["toy"].latent_channels, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    full = vae.decode(z)
    err = lambda overlap: ((vae.decode(z, tile=12, overlap=overlap) - full).norm() / full.norm()).item()  # noqa: E731
    blended = err(8)
    assert blended < 0.2
    assert blended < err(0)  # the blend beats abutting tiles


def test_kl():
    mean, logvar = torch.zeros(3, 4, 2, 5, 5), torch.zeros(3, 4, 2, 5, 5)
    assert kl(mean, logvar).shape == (3,)
    torch.testing.assert_close(kl(mean, logvar), torch.zeros(3))  # posterior == prior
    # one unit-variance element with mean 1: KL = 1/2
    torch.testing.assert_close(kl(torch.ones(1, 1), torch.zeros(1, 1)), torch.tensor([0.5]))
    assert (kl(mean, logvar + 0.3) > 0).all()


@torch.no_grad()
def test_latent_normalisation():
    vae, f = random_vae(), VAE_SIZES["toy"].temporal_factor
    batches = [video(1 + 3 * f, seed=i) for i in range(3)]
    shift, scale = estimate_latent_stats(vae, batches)
    assert not torch.equal(shift[0], shift[1])  # the image latent has its own statistics
    raw = torch.cat([vae.encode(x) for x in batches])
    z = vae.normalize(raw)
    for part in (z[:, :, :1], z[:, :, 1:]):  # each group is standardised per channel
        torch.testing.assert_close(part.mean((0, 2, 3, 4)), torch.zeros(z.shape[1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(part.std((0, 2, 3, 4), correction=0), torch.ones(z.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(vae.denormalize(z), raw, atol=ATOL, rtol=1e-5)  # raw latents of a random net are large
    # a later frame on its own (autoregressive sampling) uses the later frames' statistics
    torch.testing.assert_close(vae.normalize(raw[:, :, 2:3], start=2), z[:, :, 2:3])
    state = vae.state_dict()  # saved with the weights
    assert torch.equal(state["latent_shift"], shift) and torch.equal(state["latent_scale"], scale)


def test_bad_inputs():
    vae, cfg = random_vae(), VAE_SIZES["toy"]
    with pytest.raises(ValueError, match="frame count"):
        vae.encode(video(1 + cfg.temporal_factor + 1))
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(video(1, size=cfg.spatial_factor * 4 + 2))
    with pytest.raises(ValueError, match="video"):
        vae.encode(torch.zeros(1, 3, 16, 16))


def test_training_loss_reaches_both_networks():
    """The one loss trains the VAE (pixel + KL + adaptive GAN term) and the discriminator (hinge)."""
    vae, disc = random_vae(), PatchDiscriminator(width=8, n_layers=2, norm_groups=4)
    vae.train()
    x = video(1 + VAE_SIZES["toy"].temporal_factor, batch=2)
    loss, logs = vae_training_loss(vae, x, disc=disc, step=1, disc_start=1)
    loss.backward()
    assert torch.isfinite(loss) and {"rec", "kl", "g", "adaptive_w", "d"} <= logs.keys()
    assert all(p.grad is not None for p in vae.parameters())
    assert all(p.grad is not None for p in disc.parameters())


def test_psnr():
    x = torch.zeros(2, 3, 1, 4, 4)
    assert psnr(x, x + 0.02) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.02 ** 2)).item(), rel=1e-4)
