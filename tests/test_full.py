"""The full recipe (train.py --preset=full): the dry run on the meta device, the phases of Table 4,
extraction through train.py, training on extracted features (resume, phase chaining, DDP and FSDP
over two gloo processes), and sample.py on the checkpoint. A tiny full-shaped run: a 2-block MM-DiT,
64x128 frames of 17 pixel frames (8x16 latents of 3 frames), K = 3, and a frozen tiny text encoder
standing in for T5/CLIP (no transformers import), except in the last test, which runs MiniLM."""
import dataclasses
import json
import os
import resource
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import config
import dit
import text_to_video
import sample
import text_encoders
import train
import vae

TEXT_DIM, POOLED_DIM = 12, 8
TINY = ["--width=32", "--depth=2", "--heads=2", "--size=64", "--frame_width=128", "--frames=17", "--batch_size=4",
        "--global_batch=8", "--max_steps=2", "--warmup_steps=1", "--log_every=1", "--save_every=0", "--device=cpu",
        "--workers=0"]
CAPTIONS = ["a red ball rolls", "waves on a beach", "a city at night", "a dog runs", "snow falls", "a bird"]


def tiny_text_encoder(spec, dtype=None):
    """The stand-in for text_encoders.load_text_encoder: a frozen, seeded ToyTextEncoder (same weights on every call)."""
    torch.manual_seed(7)
    encoder = text_to_video.ToyTextEncoder(TEXT_DIM, POOLED_DIM).requires_grad_(False).eval()
    encoder.text_dim, encoder.pooled_dim = TEXT_DIM, POOLED_DIM
    return encoder


def write_media(folder):
    """Four mp4s (three of 17 frames, one of 9) and two png images at 64x128, and their jsonl."""
    import imageio.v2 as imageio
    from PIL import Image
    g = np.random.default_rng(0)
    lines = []
    for j, frames in enumerate([17, 17, 17, 9]):
        clip = (g.random((frames, 64, 128, 3)) * 255).astype(np.uint8)
        imageio.mimwrite(folder / f"v{j}.mp4", list(clip), fps=24, macro_block_size=1)  # the full preset's rate
        lines.append(dict(video=f"v{j}.mp4", text=CAPTIONS[j]))
    for j in range(2):
        Image.fromarray((g.random((64, 128, 3)) * 255).astype(np.uint8)).save(folder / f"i{j}.png")
        lines.append(dict(image=f"i{j}.png", text=CAPTIONS[4 + j]))
    with open(folder / "data.jsonl", "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return folder / "data.jsonl"


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """(extracted.jsonl, vae.pt) made by train.py --task=extract with a tiny 8x8x8 VAE."""
    root = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    model = vae.CausalVAE(vae.VAEConfig(latent_channels=4, widths=(8, 8, 8, 8), enc_blocks=1, dec_blocks=1,
                                        norm_groups=0))
    vae_path = str(root / "vae.pt")
    torch.save(dict(kind="causal-vae", config=dataclasses.asdict(model.cfg), model=model.state_dict()), vae_path)
    data = write_media(root)
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(text_encoders, "load_text_encoder", tiny_text_encoder)
        train.main(["--preset=full", "--phase=2", "--task=extract", f"--data={data}", f"--out_dir={root / 'features'}",
                    f"--vae_ckpt={vae_path}", "--text_encoder=tiny", "--size=64", "--frame_width=128", "--frames=17"])
    return str(root / "features" / "extracted.jsonl"), vae_path


def run(tmp_path, extracted, *argv):
    data, vae_path = extracted
    train.main(TINY + [f"--data={data}", f"--out_dir={tmp_path}", f"--vae_ckpt={vae_path}", "--text_encoder=tiny",
                       "--preset=full", *argv])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- the recipe on paper

def test_dry_run_of_every_phase_on_the_meta_device(capsys):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train.main(["--preset=full", "--dry_run=true", "--world=8"])
    out = capsys.readouterr().out
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 1e9  # 2B fp32 would be 8 GB
    assert out.count("params: 2,028,334,144 (2.03B)") == 3
    phase1, phase2, phase3 = out.split("preset full, phase ")[1:]
    assert "tokens per sample: pyramid 960 vs full-sequence 960" in phase1
    assert "global batch 1536 = 12 per GPU x 8 GPUs x 16 accumulation steps" in phase1
    assert "tokens per sample: pyramid 2,940 vs full-sequence 15,360" in phase2
    assert "global batch 768 = 4 per GPU x 8 GPUs x 24 accumulation steps" in phase2
    assert "tokens per sample: pyramid 15,360 vs full-sequence 119,040" in phase3
    assert "global batch 384 = 1 per GPU x 8 GPUs x 48 accumulation steps" in phase3
    assert "memory per GPU (an estimate): DDP 43.8 GB" in phase3 and "FSDP over 8 GPUs 8.3 GB" in phase3


def test_dry_run_of_the_laptop_presets(capsys):
    for preset in ("tiny", "toy2d", "vae-toy"):
        train.main([f"--preset={preset}", "--dry_run=true"])
        out = capsys.readouterr().out
        assert f"preset {preset}:" in out and "params: " in out and "memory per GPU (an estimate)" in out


def test_phase_configs_equal_table_4():
    table4 = {1: dict(global_batch=1536, lr=1e-4, beta2=0.999, max_steps=50_000, size=384, frame_width=640,
                      frames=1, image_ratio=1.0),
              2: dict(global_batch=768, lr=1e-4, beta2=0.95, max_steps=200_000, size=384, frame_width=640,
                      frames=121, image_ratio=0.125),   # 5 s at 24 fps: 16 latent frames
              3: dict(global_batch=384, lr=5e-5, beta2=0.95, max_steps=50_000, size=768, frame_width=1280,
                      frames=241, image_ratio=0.125)}  # 10 s: 31 latent frames
    for phase, expected in table4.items():
        cfg = config.parse_args(["--preset=full", f"--phase={phase}"])
        assert {k: getattr(cfg, k) for k in expected} == expected
        assert (cfg.beta1, cfg.adam_eps, cfg.weight_decay, cfg.grad_clip, cfg.warmup_steps, cfg.lr_decay) == \
            (0.9, 1e-6, 1e-4, 1.0, 1000, "none")
        assert (cfg.K, cfg.stage_ratio, cfg.model, cfg.vae_size, cfg.grad_checkpointing) == \
            (3, "1,2,1", "paper", "paper", True)
    assert config.Config().adam_eps == 1e-8  # the toy presets keep torch's default
    cfg = config.parse_args(["--preset=full", "--phase=3", "--lr=1e-3"])  # an override wins over the phase
    assert cfg.lr == 1e-3 and config.run_dir(cfg) == os.path.join("out", "full", "phase3")
    for argv, msg in ((["--preset=full", "--phase=4"], "phases 1 to 3"), (["--preset=tiny", "--phase=1"], "no phases")):
        with pytest.raises(SystemExit, match=msg):
            config.parse_args(argv)


def test_global_batch_is_reached_by_accumulation_or_refused():
    cfg = config.parse_args(["--preset=full", "--phase=3"])
    assert config.accumulation(cfg, 8) == 48 and config.accumulation(cfg, 384) == 1
    with pytest.raises(SystemExit, match="batch sizes that fit: 1, 3$") as e:
        config.accumulation(dataclasses.replace(cfg, batch_size=2), 128)  # 384 / 256 is not whole
    assert "\n" not in str(e.value)
    assert config.accumulation(config.Config(grad_accum=3), 8) == 3  # global_batch 0: grad_accum as set


# ---------------------------------------------------------------- the model on text features

def test_text_features_give_what_the_toy_encoder_gives():
    torch.manual_seed(0)
    net = text_to_video.TextToVideo(dataclasses.replace(dit.SIZES["toy"], width=32, depth=1, heads=2)).eval()
    frames = [torch.randn(2, 3, 8, 8)]
    t, captions = torch.rand(2), ["a red circle", "a blue square moving up"]
    feats = net.text_encoder(captions)
    assert torch.equal(net(frames, captions, t), net(frames, feats, t))
    null = net.text_encoder([""])
    assert torch.allclose(net.guided(frames, captions, t, 3.0), net.guided(frames, feats, t, 3.0, null=null), atol=1e-6)
    bare = text_to_video.TextToVideo(net.dit.cfg, toy_text=False)
    assert bare.text_encoder is None and not any(k.startswith("text_encoder") for k in bare.state_dict())
    with pytest.raises(ValueError, match="text features"):
        bare(frames, captions, t)


# ---------------------------------------------------------------- training on extracted features

def test_extraction_writes_features_the_dataset_reads(extracted):
    import video_data
    ds = video_data.FeatureDataset(extracted[0])
    assert len(ds) == 6 and sorted(ds.buckets) == [1, 2, 3] and ds.latent_size == (8, 16)
    assert (ds.text_dim, ds.pooled_dim, ds.latent_channels) == (TEXT_DIM, POOLED_DIM, 4)


def test_a_phase_trains_on_features_and_resumes_exactly(tmp_path, extracted):
    alone = ("--phase=2", "--init_from=none")  # from scratch, not from phase 1
    run(tmp_path / "a", extracted, *alone, "--max_steps=3")
    run(tmp_path / "b", extracted, *alone, "--max_steps=2")
    run(tmp_path / "b", extracted, *alone, "--max_steps=3")  # its checkpoint exists: resumes
    a, b = (load(tmp_path / d / "phase2" / "ckpt.pt") for d in ("a", "b"))
    assert a["history"] == b["history"] and len(a["history"]) == 3
    assert a["config"]["grad_accum"] == 2 and a["config"]["adam_eps"] == 1e-6  # 8 = 4 x 1 process x 2
    assert a["text_features"] and not any(k.startswith("net.text_encoder") for k in a["model"])
    batch = train.FeatureVideo(config.parse_args(TINY + ["--preset=full", "--phase=2", f"--data={extracted[0]}"]))
    groups = batch.batch(train.step_generator(batch.cfg, 0, 0, 0), "cpu")["groups"]
    assert [(g["stage"], g["x_t"].shape[0]) for g in groups] == [(2, 1), (1, 2), (0, 1)]  # 1:2:1
    short = train.FeatureVideo(dataclasses.replace(batch.cfg, frames=9))  # clips cut to 2 latent frames
    assert {T: len(ids) for T, ids in short.buckets.items()} == {1: 2, 2: 4}
    one = train.FeatureVideo(dataclasses.replace(batch.cfg, batch_size=1))  # a micro-batch of one clip
    drawn = [one.stages(train.step_generator(one.cfg, 0, s, 0)) for s in range(400)]
    assert all(len(d) == 1 and d[0][1] == 1 for d in drawn)
    counts = [sum(d[0][0] == k for d in drawn) for k in (2, 1, 0)]
    assert 70 < counts[0] < 130 and 160 < counts[1] < 240 and 70 < counts[2] < 130  # 1:2:1 over micro-steps
    for bad, msg in ((dict(data=""), "pass --data=PATH/extracted.jsonl"),
                     (dict(size=128), "latents of .* are 8x16; this run trains at 128x128"),
                     (dict(fsdp=True), "launch with torchrun")):
        with pytest.raises(SystemExit, match=msg):
            train.train(dataclasses.replace(batch.cfg, out_dir=str(tmp_path / "c"), **bad), quiet=True)


def test_phases_run_in_order_each_from_the_last_and_finished_ones_are_skipped(tmp_path, extracted, capsys):
    with pytest.raises(SystemExit, match="starts from phase 1's checkpoint"):
        run(tmp_path, extracted, "--phase=2")
    run(tmp_path, extracted, "--max_steps=1")  # all three phases
    cks = [load(tmp_path / f"phase{n}" / "ckpt.pt") for n in (1, 2, 3)]
    assert [ck["config"]["init_from"] for ck in cks] == ["", str(tmp_path / "phase1" / "ckpt.pt"),
                                                         str(tmp_path / "phase2" / "ckpt.pt")]
    assert [ck["config"]["image_ratio"] for ck in cks] == [1.0, 0.125, 0.125]
    run(tmp_path, extracted, "--max_steps=1")
    assert capsys.readouterr().out.count("finished (1 of 1 steps") == 3
    # phase 2 at learning rate 0 keeps phase 1's weights: it started from them (fresh optimizer)
    run(tmp_path / "lr0", extracted, "--phase=1", "--max_steps=1")
    run(tmp_path / "lr0", extracted, "--phase=2", "--max_steps=1", "--lr=0")
    one, two = (load(tmp_path / "lr0" / f"phase{n}" / "ckpt.pt")["model"] for n in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)
    torch.manual_seed(0)  # train() seeds with --seed before building the model
    init = train.FeatureVideo(config.parse_args(TINY + ["--preset=full", "--phase=2", f"--data={extracted[0]}"]))
    init = init.model().state_dict()
    assert any(not torch.equal(one[k], init[k]) for k in one)  # and phase 1 did train


def test_an_interrupted_later_phase_resumes_and_resume_starts_new_phases(tmp_path, extracted):
    """Phase 2, stopped part-way, resumes with the same command (its init_from, recorded, is not a
    changed setting); `--resume=true` over all phases resumes the started one and starts the next fresh."""
    run(tmp_path, extracted, "--phase=1", "--max_steps=1")
    run(tmp_path, extracted, "--phase=2", "--max_steps=1")             # "interrupted" after one of two steps
    run(tmp_path, extracted, "--max_steps=2", "--resume=true")          # phase 1 resumes, 2 resumes, 3 is new
    cks = [load(tmp_path / f"phase{n}" / "ckpt.pt") for n in (1, 2, 3)]
    assert [ck["step"] for ck in cks] == [2, 2, 2]
    assert cks[1]["config"]["init_from"] == str(tmp_path / "phase1" / "ckpt.pt")
    assert cks[2]["config"]["init_from"] == str(tmp_path / "phase2" / "ckpt.pt")


@pytest.mark.parametrize("extra,msg", [
    (["--dry_run=true", "--batch_size=0"], "--batch_size=0 must be >= 1"),
    (["--task=extract", "--lr=nan"], "--lr must be a finite number"),
    (["--phase=2", "--init_from=none", "--fsdp=true"], "--fsdp=true shards over the processes of torchrun"),
    (["--phase=2", "--init_from=none", "--full_sequence=true", "--K=1", "--causal=false", "--stage_ratio=1", "--sample_steps=1",
      "--sample_steps_later=1"], "--full_sequence=true trains on the toy data"),
])
def test_every_route_checks_its_settings_first(tmp_path, extracted, extra, msg):
    with pytest.raises(SystemExit, match=msg) as e:
        run(tmp_path, extracted, *extra)
    assert "\n" not in str(e.value) and not (tmp_path / "phase2").exists()


def test_frame_width_is_refused_on_the_square_toy_data(tmp_path):
    with pytest.raises(SystemExit, match="--frame_width is for real data"):
        train.validate(config.parse_args(["--frame_width=64", f"--out_dir={tmp_path}"]))


# ---------------------------------------------------------------- two processes: DDP and FSDP

def _worker(rank, port, out, data):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    argv = TINY + ["--preset=full", "--phase=2", f"--data={data}", "--global_batch=16"]
    ddp = dataclasses.replace(config.parse_args(argv), out_dir=f"{out}/ddp", max_steps=2)
    train.train(ddp, quiet=True)
    fsdp = dataclasses.replace(ddp, out_dir=f"{out}/fsdp", fsdp=True, max_steps=1)
    train.train(fsdp, quiet=True)
    train.train(dataclasses.replace(fsdp, max_steps=2, resume=True), quiet=True)  # the sharded checkpoint resumes
    root = os.path.dirname(os.path.dirname(data))  # extraction sharded over both ranks, then merged by rank 0
    text_encoders.load_text_encoder = tiny_text_encoder
    train.main(["--preset=full", "--phase=2", "--task=extract", f"--data={root}/data.jsonl",
                f"--out_dir={out}/features", f"--vae_ckpt={root}/vae.pt", "--text_encoder=tiny", "--size=64",
                "--frame_width=128", "--frames=17"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_under_ddp_and_fsdp_train_the_same_model(tmp_path, extracted):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), extracted[0]), nprocs=2, join=True)
    assert load(tmp_path / "fsdp" / "phase2" / "ckpt.pt")["sharded"] == "ckpt.step2.dcp"  # an index of shards
    checkpoint.consolidate(str(tmp_path / "fsdp" / "phase2" / "ckpt.pt"), str(tmp_path / "fsdp" / "model.pt"))
    ddp, fsdp = load(tmp_path / "ddp" / "phase2" / "ckpt.pt"), load(tmp_path / "fsdp" / "model.pt")
    assert ddp["config"]["grad_accum"] == 2  # 16 = 4 x 2 processes x 2
    assert ddp["model"].keys() == fsdp["model"].keys() and ddp["ema"].keys() == fsdp["ema"].keys()
    for key in ddp["model"]:  # full tensors, as an unsharded run writes them
        assert ddp["model"][key].shape == fsdp["model"][key].shape
        assert torch.allclose(ddp["model"][key], fsdp["model"][key], atol=1e-6), key
    assert ddp["history"] == pytest.approx(fsdp["history"], rel=1e-5)
    import video_data
    one, two = (video_data.load_entries(path) for path in (extracted[0], tmp_path / "features" / "extracted.jsonl"))
    assert sorted(e["text"] for e in one) == sorted(e["text"] for e in two)
    for e in two:  # the same latents as a one-process extraction
        (same,) = [o for o in one if o["text"] == e["text"]]
        assert torch.equal(load(same["latent"]), load(e["latent"]))


# ---------------------------------------------------------------- sampling

def test_sample_py_generates_from_a_full_checkpoint(tmp_path, extracted, monkeypatch):
    run(tmp_path, extracted, "--phase=2", "--init_from=none", "--max_steps=1")
    monkeypatch.setattr(text_encoders, "load_text_encoder", tiny_text_encoder)
    out = tmp_path / "a.gif"
    ckpt = str(tmp_path / "phase2" / "ckpt.pt")
    sample.main([f"--ckpt={ckpt}", "--prompt=a dog runs", f"--out={out}", "--frames=17", "--steps=1,1,1",
                 "--steps_later=1,1,1", "--decode_chunk=1"])  # encoder and VAE: the ones the run names
    import imageio.v2 as imageio
    assert imageio.mimread(out)[0].shape[:2] == (64, 128)
    net, _, _ = sample.load(ckpt, text_encoder="tiny")
    assert isinstance(net.text_encoder, text_to_video.ToyTextEncoder) and not net.text_encoder.training
    other = text_to_video.ToyTextEncoder(5, 5)
    other.text_dim = other.pooled_dim = 5
    monkeypatch.setattr(text_encoders, "load_text_encoder", lambda spec, dtype=None: other)
    with pytest.raises(SystemExit, match="was trained on 12 and 8"):
        sample.load(ckpt)


def test_minilm_end_to_end_through_extraction_training_and_sampling(tmp_path, extracted):
    """The real loading path: a pretrained encoder (all-MiniLM-L6-v2 from its wheel, offline) extracts
    the text features, the tiny full-shaped model trains a step on them, sample.py encodes new captions."""
    pytest.importorskip("transformers")
    pytest.importorskip("all_minilm_l6_v2")
    spec = f"hf:{text_encoders.minilm_folder(str(tmp_path / 'text_encoders'))}"
    root = os.path.dirname(os.path.dirname(extracted[0]))
    train.main(["--preset=full", "--phase=2", "--task=extract", f"--data={root}/data.jsonl",
                f"--out_dir={tmp_path / 'features'}", f"--vae_ckpt={extracted[1]}", f"--text_encoder={spec}",
                "--size=64", "--frame_width=128", "--frames=17"])
    features = str(tmp_path / "features" / "extracted.jsonl")
    run(tmp_path, (features, extracted[1]), "--phase=2", "--init_from=none", "--max_steps=1", f"--text_encoder={spec}")
    ckpt = load(tmp_path / "phase2" / "ckpt.pt")
    assert (ckpt["dit_config"]["text_dim"], ckpt["dit_config"]["pooled_dim"]) == (384, 384)
    sample.main([f"--ckpt={tmp_path / 'phase2' / 'ckpt.pt'}", "--prompt=a dog runs", f"--out={tmp_path / 'a.gif'}",
                 "--frames=9", "--steps=1,1,1", "--steps_later=1,1,1"])
    assert (tmp_path / "a.gif").exists()
