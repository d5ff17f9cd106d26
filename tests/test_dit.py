"""Tests of dit.py: attention paths, causality, conditioning, positions, sizes, errors. CPU, fp32."""
import dataclasses

import pytest
import torch

from dit import SIZES, DiTConfig, MMDiT, block_causal_mask, spatial_positions
from text_to_video import ToyTextEncoder

TINY = DiTConfig(in_channels=4, patch_size=2, width=32, depth=3, heads=2, text_dim=12, pooled_dim=10)
B, L = 2, 5


def make_model(seed=0, randomize=True, **overrides):
    """A tiny model; randomize=True perturbs every weight so the zero-init (adaLN gates, final
    layer) does not hide the dependencies that the tests look for."""
    torch.manual_seed(seed)
    model = MMDiT(dataclasses.replace(TINY, **overrides)).eval()
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model


def make_inputs(sizes=(4, 8, 16, 16), seed=1):
    """Frames of the given side lengths (a temporal pyramid: 1/4, 1/2, full, current) + text."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(B, TINY.in_channels, s, s, generator=g) for s in sizes]
    text = torch.randn(B, L, TINY.text_dim, generator=g)
    text_mask = torch.tensor([[True] * L, [True, True, True, False, False]])  # sample 1 is padded
    pooled = torch.randn(B, TINY.pooled_dim, generator=g)
    t = torch.rand(B, generator=g)
    return frames, text, text_mask, pooled, t


def hidden_states(model, *inputs, **kwargs):
    """Run the model and return its output and the (img, txt) outputs of every block."""
    states = []
    hooks = [b.register_forward_hook(lambda m, i, out: states.append(out)) for b in model.blocks]
    out = model(*inputs, **kwargs)
    for h in hooks:
        h.remove()
    return out, states


def frame_slices(frames, patch):
    """Token index range of each frame in the video stream."""
    sizes = [f.shape[-2] * f.shape[-1] // patch ** 2 for f in frames]
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [slice(e - n, e) for n, e in zip(sizes, ends)]


def test_sdpa_matches_manual_attention():
    model = make_model()
    manual = make_model(manual_attention=True)
    manual.load_state_dict(model.state_dict())
    inputs = make_inputs()
    torch.testing.assert_close(model(*inputs), manual(*inputs), atol=1e-5, rtol=1e-5)


def test_per_frame_attention_matches_masked_attention():
    model = make_model()
    per_frame = make_model(per_frame_attention=True)
    per_frame.load_state_dict(model.state_dict())
    inputs = make_inputs()
    torch.testing.assert_close(model(*inputs), per_frame(*inputs), atol=1e-5, rtol=1e-5)


def test_mask_layout():
    # text "a <pad>" (frame 0), frame 0 with 1 token, frame 1 with 2 tokens
    frame_of_token = torch.tensor([0, 0, 0, 1, 1])
    key_valid = torch.tensor([[True, False, True, True, True]])
    expected = torch.tensor([[1, 0, 1, 0, 0],
                             [1, 0, 1, 0, 0],
                             [1, 0, 1, 0, 0],
                             [1, 0, 1, 1, 1],
                             [1, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(frame_of_token, key_valid)[0, 0], expected)
    assert block_causal_mask(frame_of_token, key_valid).any(-1).all(), "a query row is fully masked"


def test_attention_has_no_nan_for_empty_caption():
    frames, text, _, pooled, t = make_inputs()
    out = make_model()(frames, text, torch.zeros(B, L, dtype=torch.bool), pooled, t)
    assert out.isfinite().all()


@pytest.mark.parametrize("perturbed", [1, 2])
def test_later_frames_do_not_change_earlier_tokens(perturbed):
    model = make_model()
    frames, text, text_mask, pooled, t = make_inputs()
    _, states = hidden_states(model, frames, text, text_mask, pooled, t)
    frames2 = list(frames)
    frames2[perturbed] = frames[perturbed] + torch.randn_like(frames[perturbed])
    _, states2 = hidden_states(model, frames2, text, text_mask, pooled, t)
    earlier = slice(0, frame_slices(frames, TINY.patch_size)[perturbed].start)
    later = slice(earlier.stop, None)
    for (img, txt), (img2, txt2) in zip(states, states2):
        torch.testing.assert_close(img[:, earlier], img2[:, earlier], atol=0, rtol=0)
        torch.testing.assert_close(txt, txt2, atol=0, rtol=0)
    assert not torch.allclose(states[-1][0][:, later], states2[-1][0][:, later])


def test_earlier_frame_changes_current_output():
    model = make_model()
    frames, *rest = make_inputs()
    frames2 = [frames[0] + torch.randn_like(frames[0])] + frames[1:]
    assert (model(frames, *rest) - model(frames2, *rest)).abs().max() > 1e-4


def test_bidirectional_lets_later_frames_change_earlier_tokens():
    model = make_model(causal=False)
    frames, *rest = make_inputs()
    _, states = hidden_states(model, frames, *rest)
    frames2 = frames[:-1] + [frames[-1] + torch.randn_like(frames[-1])]
    _, states2 = hidden_states(model, frames2, *rest)
    first = frame_slices(frames, TINY.patch_size)[0]
    assert not torch.allclose(states[-1][0][:, first], states2[-1][0][:, first])


def test_padded_text_tokens_have_no_effect():
    model = make_model()
    frames, text, text_mask, pooled, t = make_inputs()
    garbage = text.clone()
    garbage[~text_mask] = 100 * torch.randn_like(garbage[~text_mask])
    torch.testing.assert_close(model(frames, text, text_mask, pooled, t),
                               model(frames, garbage, text_mask, pooled, t), atol=1e-6, rtol=1e-6)
    # and the same as not having the padding at all
    n = int(text_mask[1].sum())
    short = [x[1:2] for x in frames], text[1:2, :n], text_mask[1:2, :n], pooled[1:2], t[1:2]
    full = [x[1:2] for x in frames], text[1:2], text_mask[1:2], pooled[1:2], t[1:2]
    torch.testing.assert_close(model(*short), model(*full), atol=1e-5, rtol=1e-5)


def test_zero_output_at_init():
    model = make_model(randomize=False)
    assert model(*make_inputs()).abs().max() == 0


def test_history_positions_are_block_centres_of_the_current_grid():
    current = spatial_positions(8, 8, 8, 8).reshape(8, 8, 2)
    assert torch.equal(current[3, 5], torch.tensor([3.0, 5.0]))                  # unit grid
    for r in (2, 4):
        history = spatial_positions(8 // r, 8 // r, 8, 8).reshape(8 // r, 8 // r, 2)
        centres = current.reshape(8 // r, r, 8 // r, r, 2).mean(dim=(1, 3))   # [8/r, 8/r, 2]
        torch.testing.assert_close(history, centres)
    assert spatial_positions(4, 4, 8, 8)[1, 1].item() == 2 * 1 + 0.5              # 2i + 0.5


def test_history_hidden_states_do_not_depend_on_t():
    model = make_model()
    frames, text, text_mask, pooled, t = make_inputs()
    _, states = hidden_states(model, frames, text, text_mask, pooled, t)
    _, states2 = hidden_states(model, frames, text, text_mask, pooled, 1 - t)
    history = slice(0, frame_slices(frames, TINY.patch_size)[-1].start)
    for (img, txt), (img2, txt2) in zip(states, states2):
        torch.testing.assert_close(img[:, history], img2[:, history], atol=0, rtol=0)
        torch.testing.assert_close(txt, txt2, atol=0, rtol=0)
    assert not torch.allclose(states[-1][0][:, history.stop:], states2[-1][0][:, history.stop:])


def test_paper_size_has_about_2b_parameters():
    with torch.device("meta"):
        model = MMDiT(SIZES["paper"])
    n = sum(p.numel() for p in model.parameters())
    print(f"paper MM-DiT: {n:,} parameters")
    assert 1.9e9 < n < 2.2e9
    assert not hasattr(model.blocks[-1], "txt_mlp"), "the last block's text stream must stop after attention"


@pytest.mark.parametrize("shapes, message", [
    ([(4, 8, 8), (4, 16, 15)], "not divisible by the patch size"),
    ([(3, 8, 8), (3, 16, 16)], "channels"),
    ([(4, 32, 16), (4, 16, 16)], "larger than the current frame"),
])
def test_bad_frames_raise_clear_errors(shapes, message):
    model = make_model(randomize=False)
    _, text, text_mask, pooled, t = make_inputs()
    frames = [torch.randn(B, *shape) for shape in shapes]                     # shape = (C, h, w)
    with pytest.raises(ValueError, match=message):
        model(frames, text, text_mask, pooled, t)


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for flag in (False, True):
        model = make_model(grad_checkpointing=flag).train()
        model(*make_inputs()).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_all_frames_returns_every_frame():
    model = make_model()
    frames, *rest = make_inputs(sizes=(8, 8, 8))
    out = model(frames, *rest, all_frames=True)
    assert out.shape == (B, TINY.in_channels, 3, 8, 8)
    with pytest.raises(ValueError, match="equal frame sizes"):
        model(make_inputs()[0], *rest, all_frames=True)


def test_toy_text_encoder_handles_empty_caption():
    torch.manual_seed(0)
    enc = ToyTextEncoder(TINY.text_dim, TINY.pooled_dim)
    tokens, mask, pooled = enc(["A red square moving left", ""])
    assert tokens.shape == (2, 5, TINY.text_dim) and mask.shape == (2, 5) and pooled.shape == (2, TINY.pooled_dim)
    assert mask[0].all() and not mask[1].any()
    assert tokens.isfinite().all() and pooled.isfinite().all()
    assert enc(["", ""])[1].shape == (2, 1)                                     # all-null batch still works
    assert enc.tokenize("Red square") == enc.tokenize("red, SQUARE!")          # stable hashing (crc32)
    model = make_model(text_dim=TINY.text_dim, pooled_dim=TINY.pooled_dim)
    frames, *_, t = make_inputs()
    assert model(frames, tokens, mask, pooled, t).isfinite().all()


def test_toy_size_trains_on_pixels():
    cfg = dataclasses.replace(SIZES["toy"], in_channels=3, patch_size=2)
    model = MMDiT(cfg)
    enc = ToyTextEncoder(cfg.text_dim, cfg.pooled_dim)
    tokens, mask, pooled = enc(["a blue circle", ""])
    out = model([torch.randn(2, 3, 16, 16)], tokens, mask, pooled, torch.rand(2))
    assert out.shape == (2, 3, 16, 16)
