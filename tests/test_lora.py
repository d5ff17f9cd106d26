"""lora.py: a frozen base gets no gradient, adapters start as the identity, merging equals applying,
adapter checkpoints hold only adapters and are refused against another base; train.py and sample.py
with adapters (resume, DDP and FSDP2 over two gloo processes); the colours option of the toy data."""
import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import config
import dit
import text_to_video
import lora
import sample
import train
from toy import data, evaluate

CFG = dataclasses.replace(dit.SIZES["toy"], width=32, depth=2, heads=2, text_dim=16, pooled_dim=16)


def net_and_inputs(seed=0):
    torch.manual_seed(seed)
    net = text_to_video.TextToVideo(CFG, vocab_size=64, max_len=8)
    with torch.no_grad():  # a "trained" base: no zero-initialised gate or output layer
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    history = [torch.randn(2, 3, 8, 8)]
    return net, (history + [torch.randn(2, 3, 8, 8)], ["a red circle", "a cyan square"], torch.rand(2))


def test_frozen_base_gets_no_gradient_and_no_optimizer_state():
    net, inputs = net_and_inputs()
    n = lora.add_lora(net, rank=2)
    assert n == 2 * 2 * 4 - 3  # per block qkv, proj, mlp x2 of both streams; the last text stream: qkv only
    net(*inputs).square().mean().backward()
    base = [(k, p) for k, p in net.named_parameters() if "lora_" not in k]
    assert base and all(not p.requires_grad and p.grad is None for _, p in base)
    # A gets no gradient at step 0 (B = 0), B does
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for k, p in net.named_parameters() if "lora_B" in k)
    trained = [p for p in net.parameters() if p.requires_grad]
    assert len(trained) == 2 * n and sum(p.numel() for p in trained) < 0.2 * sum(p.numel() for _, p in base)


def test_adapters_start_as_the_identity():
    net, inputs = net_and_inputs()
    before = net(*inputs)
    lora.add_lora(net, rank=4, alpha=8, modules="qkv,proj,mlp,adaLN")
    assert torch.equal(net(*inputs), before)


def test_merge_equals_apply_and_weights_scale_the_update():
    net, inputs = net_and_inputs()
    base = net(*inputs)
    lora.add_lora(net, rank=3, alpha=6)
    with torch.no_grad():
        for k, p in net.named_parameters():
            if "lora_B" in k:
                p.normal_(0, 0.1)
    applied = net(*inputs)
    assert (applied - base).abs().max() > 1e-2  # the adapters change the output
    keys = set(net.state_dict())
    lora.merge_lora(net)
    assert not any(isinstance(m, lora.LoRALinear) for m in net.modules())
    assert set(net.state_dict()) == {k for k in keys if "lora_" not in k}  # a plain network again
    torch.testing.assert_close(net(*inputs), applied, atol=1e-5, rtol=1e-5)


def test_a_frozen_pretrained_text_encoder_is_not_the_networks_own():
    """own_state (hash of the base, --merge's weights): a features model's frozen encoder, set by
    sample.py, is left out (its checkpoint's network is built without one); a toy encoder is in."""
    net = text_to_video.TextToVideo(CFG, toy_text=False)
    without = set(lora.own_state(net))
    net.text_encoder = torch.nn.Linear(4, 4)  # stands for T5 + CLIP
    assert set(lora.own_state(net)) == without and not any(k.startswith("text_encoder.") for k in without)
    toy, _ = net_and_inputs()
    assert any(k.startswith("text_encoder.") for k in lora.own_state(toy))


def test_hash_is_of_the_weights():
    a, _ = net_and_inputs(0)
    b, _ = net_and_inputs(0)
    assert lora.base_sha256(a) == lora.base_sha256(b)
    with torch.no_grad():
        b.dit.blocks[0].img_qkv.weight[0, 0] += 1e-6
    assert lora.base_sha256(a) != lora.base_sha256(b)


# ---------------------------------------------------------------- train.py and sample.py

def tiny(out, **kw):
    """A pixel-space toy run of one step at a tiny size."""
    cfg = config.parse_args(["--preset=tiny-pixel"])
    small = dict(out_dir=str(out), width=32, depth=1, heads=1, batch_size=6, frames=2, size=16, eval_captions=0,
                 max_steps=1, log_every=1, warmup_steps=1, sample_steps="1,1,1", sample_steps_later="1,1,1")
    return dataclasses.replace(cfg, **(small | kw))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two one-step base checkpoints of the same network and different weights."""
    out = tmp_path_factory.mktemp("bases")
    for seed in (0, 1):
        train.train(tiny(out / f"base{seed}", seed=seed), quiet=True)
    return [str(out / f"base{seed}" / "ckpt.pt") for seed in (0, 1)]


def test_a_lora_run_saves_adapters_resumes_and_is_refused_against_another_base(tmp_path, bases, capsys):
    cfg = tiny(tmp_path / "lora", init_from=bases[0], lora_rank=2, colours="cyan", max_steps=2)
    train.train(cfg, quiet=True)
    ck = torch.load(tmp_path / "lora" / "ckpt.pt", weights_only=True)
    assert ck["model"] and all(".lora_" in k for k in ck["model"]) and ck["ema"].keys() == ck["model"].keys()
    assert ck["lora"]["base"] == bases[0] and len(ck["lora"]["base_sha256"]) == 64
    base = torch.load(bases[0], weights_only=True)
    assert ck["ema"]["net.dit.blocks.0.img_qkv.lora_A"].shape == (2, 32)
    # resuming continues the adapters; the base must be the same
    train.train(dataclasses.replace(cfg, max_steps=3, resume=True), quiet=True)
    with pytest.raises(SystemExit, match="adapts the base") as e:
        train.train(dataclasses.replace(cfg, max_steps=4, resume=True, init_from=bases[1]), quiet=True)
    assert "\n" not in str(e.value)
    # sample.py: applied to its base (adapters merged with a weight), refused against the other
    adapter = str(tmp_path / "lora" / "ckpt.pt")
    net, _, _ = sample.load(bases[1])
    with pytest.raises(SystemExit, match="adapts the base") as e:
        lora.apply_files(net, adapter, bases[1])
    assert "\n" not in str(e.value)
    net, _, _ = sample.load(bases[0])
    assert net.state_dict().keys() == {k[4:] for k in base["ema"]}
    assert lora.apply_files(net, f"{adapter}:0.5,{adapter}", bases[0]) == [(adapter, 0.5), (adapter, 1.0)]
    # --merge writes a plain checkpoint that loads like any other
    out = str(tmp_path / "merged.pt")
    sample.main(["--ckpt", bases[0], f"--lora={adapter}", f"--merge={out}"])
    merged, _, _ = sample.load(out)
    applied, _, _ = sample.load(bases[0])
    lora.apply_files(applied, adapter, bases[0])
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), applied.state_dict().values()))
    video = str(tmp_path / "a.gif")
    sample.main(["--ckpt", bases[0], f"--lora={adapter}:0.7", "--prompt=a cyan circle moving left", f"--out={video}",
                 "--steps=1,1,1", "--steps_later=1,1,1"])
    assert os.path.exists(video)


@pytest.mark.parametrize("kw,msg", [(dict(init_from=""), "give --init_from=PATH"),
                                    (dict(lora_modules="nothing"), "names no Linear layer"),
                                    (dict(colours="cyan,pink"), "--colours takes"),
                                    (dict(lora_rank=-1), "--lora_rank=-1 must be >= 0")])
def test_bad_lora_settings_are_one_line(tmp_path, bases, kw, msg):
    with pytest.raises(SystemExit, match=msg) as e:
        train.train(tiny(tmp_path / "x", **(dict(init_from=bases[0], lora_rank=2) | kw)), quiet=True)
    assert "\n" not in str(e.value)


def _worker(rank, port, out, base):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        cfg = tiny(f"{out}/{name}", init_from=base, lora_rank=2, fsdp=fsdp, max_steps=2)
        train.train(cfg, quiet=True)
        train.train(dataclasses.replace(cfg, max_steps=3, resume=True), quiet=True)


def test_ddp_and_fsdp_train_the_same_adapters(tmp_path, bases):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path), bases[0]), nprocs=2, join=True)
    ddp, fsdp = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("ddp", "fsdp"))
    assert ddp["model"].keys() == fsdp["model"].keys() and all("lora_" in k for k in ddp["model"])
    for key in ddp["model"]:
        torch.testing.assert_close(ddp["model"][key], fsdp["model"][key], atol=1e-6, rtol=1e-5)
    assert ddp["lora"] == fsdp["lora"]


# ---------------------------------------------------------------- the colours option

def test_default_colours_draw_the_same_clips_and_cyan_is_scored_when_asked():
    a = data.shapes_batch(8, frames=3, generator=5)
    b = data.shapes_batch(8, frames=3, generator=5, colours=tuple(data.COLOURS))
    assert a[1] == b[1] and torch.equal(a[0], b[0]) and len(data.SHAPE_CAPTIONS) == 48
    caps = data.shape_captions(("cyan",))
    video, captions = data.shapes_batch(12, frames=4, generator=1, colours=("cyan",))
    assert all("cyan" in c for c in captions)
    assert evaluate.score_shapes(video, captions, data.ALL_COLOURS)["colour"] == 1.0
    assert evaluate.score_shapes(video, captions)["colour"] == 0.0  # the default palette has no cyan
    assert len(caps) == 12 and caps[0] == "a cyan circle moving left"


STEPS = 6  # teach_vae's steps in the test: the anchor acts from the second


def test_teaching_the_vae_cyan_leaves_the_shipped_one_and_holds_the_known_latents():
    """toy/lora.py's teach_vae: a frozen copy comes back, the VAE given is untouched, and the
    anchor holds the known colours' latents (they move less than half as far as without it)."""
    from common import load_vae
    from toy import lora as toy_lora
    shipped = load_vae(config.QUICK_START_VAE)
    before = {k: v.clone() for k, v in shipped.state_dict().items()}
    known, _ = data.shapes_batch(8, frames=5, size=16, generator=3)

    def moved(anchor):
        torch.manual_seed(0)
        taught = toy_lora.teach_vae(shipped, steps=STEPS, size=16, frames=5, batch=4, lr=1e-3, anchor=anchor)
        assert not any(p.requires_grad for p in taught.parameters()) and not taught.training
        with torch.no_grad():
            return (taught.encode(known) - shipped.encode(known)).square().mean().item()
    held, free = moved(toy_lora.ANCHOR), moved(0.0)
    assert all(torch.equal(v, before[k]) for k, v in shipped.state_dict().items())
    assert held < 0.5 * free, (held, free)
