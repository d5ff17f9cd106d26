"""Faults of real data (issue 29's sweep, and more of the same kinds) on tiny media the tests make:
annotation entries checked where they enter, extraction that records what made its folder,
feature files checked up front and skipped when found bad mid-run, settings of every phase
checked before work, decoding as players show it (rotation, timestamps, bit depth, alpha), text
encoder specs resolved offline, the global batch across world sizes.
Legend: one clip [3, F, H, W] in [-1, 1]; latents [B, C, T, h, w]; tokens [B, L, D]."""
import fcntl
import json
import os
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import common
import config
import text_to_video
import text_encoders
import train
import vae
import video_data as vd
import video_decode

SIZE, FRAMES = 32, 9          # toy VAE: temporal factor 2, spatial 4 -> 5 latent frames of 8x8
TEXT_DIM, POOLED_DIM = 16, 8


def refused(call, *needles):
    """call() ends with a one-line SystemExit holding every needle; returns the message."""
    with pytest.raises(SystemExit) as e:
        call()
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert all(n in msg for n in needles), msg
    return msg


def write_mp4(path, n, height=16, width=32, times_ms=None):
    """n frames, frame j grey 20 + 15 j with a red 4x8 block at the top left, at 10 fps or at
    the given presentation times (a variable frame rate), written by PyAV."""
    import av
    times_ms = times_ms or [100 * j for j in range(n)]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=None)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.time_base = s.codec_context.time_base = Fraction(1, 1000)
        for j, t in enumerate(times_ms):
            img = np.full((height, width, 3), 20 + 15 * j, np.uint8)
            img[:4, :8] = [255, 0, 0]
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts, frame.time_base = t, s.time_base
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def grey_index(clip):
    """The source frame index of each frame of a clip of write_mp4's frames (from the bottom half)."""
    return (((clip[:, :, -4:].mean((0, 2, 3)) + 1) * 127.5 - 20) / 15).round().int().tolist()


def models(text_dim=TEXT_DIM, seed=0):
    torch.manual_seed(seed)
    text = text_to_video.ToyTextEncoder(text_dim, POOLED_DIM).requires_grad_(False)
    text.text_dim, text.pooled_dim = text_dim, POOLED_DIM      # as text_encoders' encoders say them
    return vae.CausalVAE(vae.VAE_SIZES["toy"]).eval().requires_grad_(False), text


def annotation(root, lines, name="ann.jsonl"):
    (root / name).write_bytes(b"".join(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode()
                                       for line in lines))
    return str(root / name)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    for j in range(4):
        write_mp4(root / f"v{j}.mp4", 9 + 2 * j, SIZE, SIZE)
    Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8)).save(root / "i.png")
    return root


def good_lines(n=4):
    return [{"video": f"v{j}.mp4", "text": f"clip {j}"} for j in range(n)]


# ---------------------------------------------------------------- entries checked where they enter

def test_bad_entries_are_named_by_file_and_line_and_skipped(media, capsys):
    bad = [b'{"video": "v0.mp4", "text": "caf\xe9"}\n', {"video": "v1.mp4", "text": None},
           {"video": "v1.mp4", "text": 5}, {"video": 5, "text": "x"},
           {"video": "v1.mp4", "image": "i.png", "text": "x"}]
    path = annotation(media, good_lines() + good_lines() + bad, "mixed.jsonl")
    entries = vd.load_entries(path)
    err = capsys.readouterr().err
    assert len(entries) == 8
    for line, why in ((9, "not UTF-8 text (byte 0xe9"), (10, '"text" must be a caption (a string), got null'),
                      (11, '"text" must be a caption (a string), got 5'), (12, '"video" must be a path'),
                      (13, 'has both "video" and "image"')):
        assert f"{path}:{line}: {why}" in err, (line, err)
    assert "5 of 13 entries" in err
    refused(lambda: vd.load_entries(annotation(media, good_lines(1) + bad, "worse.jsonl")), "5 of 6 entries")


def test_a_folder_caption_that_is_not_utf8_is_named(tmp_path, capsys):
    for j in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{j}.png")
        (tmp_path / f"{j}.txt").write_bytes(b"ok" if j else b"\xff\xfe caption")
    assert len(vd.load_entries(str(tmp_path))) == 2
    assert f"{tmp_path / '0.txt'}: not UTF-8 text (byte 0xff" in capsys.readouterr().err


def test_relative_paths_fall_back_to_the_working_directory(media, tmp_path, monkeypatch, capsys):
    (tmp_path / "ann").mkdir()
    path = annotation(tmp_path / "ann", [{"video": "v0.mp4", "text": "x"}])
    monkeypatch.chdir(media)                             # the release's files: paths from where it ran
    assert vd.load_entries(path)[0]["video"] == str(media / "v0.mp4")
    assert "resolve against the working directory" in capsys.readouterr().out
    os.symlink(media / "v0.mp4", tmp_path / "ann" / "v0.mp4")   # one beside the file: that wins, silently
    assert vd.load_entries(path)[0]["video"] == str(tmp_path / "ann" / "v0.mp4")
    assert "working directory" not in capsys.readouterr().out


# ---------------------------------------------------------------- extraction knows what it made

def extract(entries, out, frames=FRAMES, vae_model=None, text=None, **kw):
    v, t = models()
    vd.extract(entries, str(out), vae_model or v, text or t, SIZE, SIZE, frames, progress=False, **kw)


def test_other_settings_into_an_extraction_folder_are_refused(media, tmp_path):
    entries = vd.load_entries(annotation(media, good_lines(2), "two.jsonl"))
    extract(entries, tmp_path)
    record = json.loads((tmp_path / vd.RECORD).read_text())
    assert record["frames"] == FRAMES and record["text_encoder"]["text_dim"] == TEXT_DIM
    refused(lambda: extract(entries, tmp_path, frames=5), "other settings", "frames 9 -> 5")
    refused(lambda: extract(entries, tmp_path, vae_model=models(seed=1)[0]), "other settings", "vae")
    null = (tmp_path / vd.NULL_TEXT).read_bytes()
    refused(lambda: extract(entries, tmp_path, text=models(text_dim=12)[1]), "other settings", "text_encoder")
    assert (tmp_path / vd.NULL_TEXT).read_bytes() == null          # the folder's own stays
    extract(entries, tmp_path)                                  # the same settings resume
    assert len(list((tmp_path / "latents").iterdir())) == 2


def test_damaged_outputs_are_extracted_again_not_kept(media, tmp_path, capsys):
    entries = vd.load_entries(annotation(media, good_lines(2), "two.jsonl"))
    extract(entries, tmp_path)
    latent = next((tmp_path / "latents").iterdir())
    text = next((tmp_path / "text").iterdir())
    good = torch.load(latent, weights_only=True)
    latent.write_bytes(latent.read_bytes()[:100])
    text.write_bytes(text.read_bytes()[:50])
    extract(entries, tmp_path)
    err = capsys.readouterr().err
    assert f"extracting again: cannot read {latent}" in err and f"extracting again: cannot read {text}" in err
    assert torch.equal(torch.load(latent, weights_only=True), good)
    torch.save(torch.full_like(good, float("nan")), latent)     # whole, but not finite
    extract(entries, tmp_path)
    assert "NaN" in capsys.readouterr().err and torch.equal(torch.load(latent, weights_only=True), good)


def test_two_extractions_into_one_folder_do_not_run_at_once(media, tmp_path):
    entries = vd.load_entries(annotation(media, good_lines(1), "one.jsonl"))
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / "lock.rank0", "a+") as f:              # another extraction holds rank 0's lock
        fcntl.flock(f, fcntl.LOCK_EX)
        refused(lambda: extract(entries, tmp_path), "another extraction")


def test_ranks_mark_their_shards_and_the_merge_names_a_missing_one(media, tmp_path):
    entries = vd.load_entries(annotation(media, good_lines(4), "four.jsonl"))
    extract(entries, tmp_path, rank=0, world=2)
    assert vd.unfinished_ranks(str(tmp_path), 2, vd.run_key(entries, 2)) == [1]
    refused(lambda: vd.merge_shards(str(tmp_path), 2), "rank 1 of 2 did not finish")
    extract(entries, tmp_path, rank=1, world=2)
    assert len(vd.load_entries(vd.merge_shards(str(tmp_path), 2))) == 4
    # a shard of another annotation (or world size) is not this run's
    assert vd.unfinished_ranks(str(tmp_path), 2, vd.run_key(entries[:3], 2)) == [0, 1]


def test_an_image_phase_takes_the_first_frame_of_videos(media, tmp_path):
    entries = vd.load_entries(annotation(media, good_lines(2) + [{"image": "i.png", "text": "an image"}], "p1.jsonl"))
    extract(entries, tmp_path, frames=1)
    lines = vd.load_entries(vd.merge_shards(str(tmp_path), 1))
    assert [e["latent_frames"] for e in lines] == [1, 1, 1]     # no video is "too short"
    clip = vd.read_clip(entries[1], SIZE, SIZE, 1, 2)
    assert clip.shape == (3, 1, SIZE, SIZE) and grey_index(clip) == [0]


def test_frames_the_vae_refuses_stop_before_any_caption_is_encoded(media, tmp_path):
    entries = vd.load_entries(annotation(media, good_lines(2), "two.jsonl"))
    v, text = models()
    text.forward = lambda captions: pytest.fail("a caption was encoded")
    refused(lambda: vd.extract(entries, str(tmp_path), v, text, SIZE, SIZE, 16, progress=False),
            "--frames=16 must be 1 + 2*k")


def test_null_text_only_writes_the_null_caption(tmp_path, monkeypatch):
    monkeypatch.setattr(text_encoders, "load_text_encoder", lambda spec, dtype=None: models()[1])
    train.main(["--task=extract", "--null_text_only=true", "--text_encoder=tiny", f"--out_dir={tmp_path}"])
    feats = torch.load(tmp_path / vd.NULL_TEXT, weights_only=True)
    assert feats["prompt_embed"].shape[-1] == TEXT_DIM and not feats["prompt_attention_mask"].any()
    refused(lambda: train.main(["--task=extract", "--null_text_only=true", f"--out_dir={tmp_path}"]),
            "--null_text_only=true needs --text_encoder")
    (tmp_path / vd.RECORD).write_text(json.dumps({"text_encoder": {"weights": "another"}}))
    refused(lambda: train.main(["--task=extract", "--null_text_only=true", "--text_encoder=tiny",
                                f"--out_dir={tmp_path}"]), "extracted with another text encoder")


# ---------------------------------------------------------------- training's features

@pytest.fixture(scope="module")
def features(media, tmp_path_factory):
    """Four extracted clips (5, 5, 5 and 5 latent frames: 9, 11, 13, 15 pixel frames cut to 9)."""
    out = tmp_path_factory.mktemp("features")
    extract(vd.load_entries(annotation(media, good_lines(4), "four.jsonl")), out)
    return vd.merge_shards(str(out), 1)


def copy_features(features, dest):
    """A copy of the extracted folder (its files are damaged by the tests)."""
    import shutil
    shutil.copytree(os.path.dirname(features), dest)
    return str(dest / vd.EXTRACTED)


def test_the_scan_names_every_file_of_another_shape(features, tmp_path, capsys):
    path = copy_features(features, tmp_path / "f")
    lines = [json.loads(line) for line in open(path)]
    lines[1]["text_dims"] = [12, POOLED_DIM]                   # another encoder's, as the annotation records
    lines[2]["latent_shape"] = [8, 5, 8, 8]                    # another VAE's
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in lines + lines[:1])
    ds = vd.FeatureDataset(path)
    err = capsys.readouterr().err
    assert len(ds) == 3 and "2 of 5 entries" in err
    assert all(f"{os.path.dirname(path)}/{lines[j]['latent']}: latents" in err for j in (1, 2))


def test_a_bad_file_found_when_it_loads_is_replaced_the_same_way_every_time(features, tmp_path, capsys):
    path = copy_features(features, tmp_path / "f")
    ds = vd.FeatureDataset(path)
    good = [ds[i]["latent"] for i in range(4)]
    bad_latent = ds.entries[1]["latent"]
    torch.save(torch.full((1, 4, 5, 8, 8), float("nan")), bad_latent)
    for _ in range(2):                                         # a fresh data set (a resumed run) does the same
        ds = vd.FeatureDataset(path)
        assert torch.equal(ds[1]["latent"], good[2])           # the next clip of its bucket
        assert f"{bad_latent}: holds NaN" in capsys.readouterr().err
    text = ds.entries[2]["text_fea"]
    open(text, "wb").write(b"truncated")                       # the scan reads no header: shapes are recorded
    ds = vd.FeatureDataset(path)
    assert torch.equal(ds[1]["latent"], good[3]) and torch.equal(ds[2]["latent"], good[3])
    assert f"cannot read {text}" in capsys.readouterr().err
    torch.save(torch.zeros(1, 4, 5, 4, 4), ds.entries[0]["latent"])   # 3 of 4 bad: past the limit
    with pytest.raises(vd.BadFeature, match="3 of 4 entries .* are bad"):
        [ds[i] for i in range(4)]


def tiny_features_run(path, out, *extra):
    return ["--preset=tiny", f"--data={path}", f"--out_dir={out}", "--width=32", "--depth=1", "--heads=2",
            "--batch_size=3", "--warmup_steps=1", "--log_every=1", "--device=cpu", "--data_pool=0", *extra]


def test_bad_files_mid_run_leave_a_checkpoint_of_the_last_good_step(features, tmp_path, monkeypatch):
    path = copy_features(features, tmp_path / "f")
    ds = vd.FeatureDataset(path)
    cfg = config.parse_args(tiny_features_run(path, tmp_path / "run", "--max_steps=20"))

    def damage(step, ema):
        if step == 2:
            for e in ds.entries[:3]:
                torch.save(torch.full((1, 4, 5, 8, 8), float("inf")), e["latent"])
    msg = refused(lambda: train.train(cfg, quiet=True, on_step=damage), "3 of 4 entries", "wrote")
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert f"at step {ck['step']}" in msg and ck["step"] >= 2 and len(ck["history"]) == ck["step"]


def test_sample_refuses_a_vae_of_other_latents(features, tmp_path, monkeypatch):
    import sample
    path = copy_features(features, tmp_path / "f")
    train.train(config.parse_args(tiny_features_run(path, tmp_path / "run", "--max_steps=1")), quiet=True)
    monkeypatch.setattr(text_encoders, "load_text_encoder", lambda spec, dtype=None: models()[1])
    other = vae.CausalVAE(vae.VAEConfig(latent_channels=8, widths=(8, 8, 8, 8), enc_blocks=1, dec_blocks=1,
                                        norm_groups=0))
    torch.save(dict(kind="causal-vae", config=vars(other.cfg), model=other.state_dict()), tmp_path / "vae.pt")
    refused(lambda: sample.load(str(tmp_path / "run" / "ckpt.pt"), text_encoder="tiny",
                                vae_ckpt=str(tmp_path / "vae.pt")), "8-channel latents", "trained on 4-channel")


# ---------------------------------------------------------------- settings checked before work

def test_every_phase_is_checked_before_the_first_trains(features, tmp_path):
    phases = f"--data={features},{features},{tmp_path / 'missing.jsonl'}"
    args = ["--preset=full", phases, f"--out_dir={tmp_path / 'run'}", "--vae_size=toy", "--size=32",
            "--frame_width=32", "--K=2", "--stage_ratio=1,2", "--width=32", "--depth=1", "--heads=2", "--device=cpu"]
    refused(lambda: train.main(args), "no annotation file", "missing.jsonl")
    assert not (tmp_path / "run" / "phase1" / "ckpt.pt").exists()
    refused(lambda: train.main(["--preset=full", "--phase=2", "--dry_run=true", "--frame_width=648"]),
            "cannot be halved")
    no_null = tmp_path / "nn"
    no_null.mkdir()
    (no_null / "extracted.jsonl").write_text(open(features).read())
    refused(lambda: train.main(args[:1] + ["--phase=2", f"--data={no_null / 'extracted.jsonl'}"] + args[2:]),
            "null_text.pt", "--null_text_only=true")


def test_text_encoder_specs_resolve_offline_in_one_line(tmp_path):
    t0 = time.time()
    refused(lambda: text_encoders.load_text_encoder("hf:some-owner/not-downloaded"),
            "not in the local Hugging Face cache")
    refused(lambda: text_encoders.load_text_encoder(f"t5clip:{tmp_path},{tmp_path}/b,{tmp_path}/c"),
            f"folder {tmp_path} holds no model")
    refused(lambda: text_encoders.load_text_encoder(f"hf:{tmp_path}/absent"), "no text encoder folder")
    assert time.time() - t0 < 10                               # no network retries


def test_a_resume_on_another_world_size_keeps_the_global_batch_or_is_refused():
    cfg = config.parse_args(["--preset=tiny", "--batch_size=4"])
    saved = vars(cfg).copy()
    refused(lambda: config.check_resumed_settings(saved, cfg, "ckpt.pt", saved_world=2, world=1),
            "global batch of 8", "--global_batch=8")
    config.check_resumed_settings(saved, cfg, "ckpt.pt", saved_world=1, world=1)
    two = config.parse_args(["--preset=tiny", "--batch_size=4", "--global_batch=8"])  # 4 x 2 processes x 1
    one = config.parse_args(["--preset=tiny", "--batch_size=4", "--global_batch=8", "--grad_accum=2"])  # x 1 x 2
    config.check_resumed_settings(vars(two), one, "ckpt.pt", saved_world=2, world=1)


# ---------------------------------------------------------------- decoding as players show it

@pytest.mark.parametrize("no_av", [False, True])
def test_a_rotated_video_is_read_upright(tmp_path, monkeypatch, no_av):
    import imageio_ffmpeg
    write_mp4(tmp_path / "flat.mp4", 3)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", "90", "-i",
                    str(tmp_path / "flat.mp4"), "-c", "copy", str(tmp_path / "phone.mp4")], check=True)
    if no_av:
        monkeypatch.setitem(sys.modules, "av", None)
    frames = video_decode._decode(str(tmp_path / "phone.mp4"), 3, lambda f: f)
    assert frames[0].shape == (32, 16, 3)                     # portrait, as a player shows it
    red = np.argwhere(frames[0][..., 0] > 200).mean(0)
    assert red[0] > 24 and red[1] < 4                          # the corner marker turned to the bottom left


@pytest.mark.parametrize("no_av", [False, True])
def test_a_variable_frame_rate_is_sampled_by_time(tmp_path, monkeypatch, no_av):
    write_mp4(tmp_path / "vfr.mp4", 7, times_ms=[0, 100, 150, 400, 450, 500, 800])
    if no_av:
        monkeypatch.setitem(sys.modules, "av", None)
    clip = vd.read_clip({"video": str(tmp_path / "vfr.mp4")}, 16, 16, 9, 2, fps=10)
    assert grey_index(clip) == [0, 1, 2, 2, 3, 5, 5, 5, 6]  # the frame on screen at each 0.1 s


def test_bit_depth_and_alpha_as_sampling_reads_them(tmp_path):
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path / "deep.png")
    Image.new("RGBA", (8, 8), (200, 100, 0, 128)).save(tmp_path / "alpha.png")
    for name in ("deep.png", "alpha.png"):
        extracted = vd.read_clip({"image": str(tmp_path / name)}, 8, 8, 1, 2)
        torch.testing.assert_close(extracted, common.read_image(str(tmp_path / name), 8)[0], atol=1 / 127.5, rtol=0)
    assert abs(float(vd.read_clip({"image": str(tmp_path / "deep.png")}, 8, 8, 1, 2).mean())) < 0.02  # grey 128


@pytest.mark.parametrize("no_av", [False, True])
def test_gifs_are_read_with_or_without_pyav_alike(tmp_path, monkeypatch, no_av):
    greys = [20, 80, 140, 200]
    frames = [Image.fromarray(np.full((8, 8, 3), g, np.uint8)) for g in greys]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=[100, 300, 100, 100])
    if no_av:
        monkeypatch.setitem(sys.modules, "av", None)
    clip = vd.read_clip({"video": str(tmp_path / "a.gif")}, 8, 8, 3, 2)
    torch.testing.assert_close(clip, common.read_video(str(tmp_path / "a.gif"), 8)[0][:, :3], atol=1 / 127.5, rtol=0)
    timed = vd.read_clip({"video": str(tmp_path / "a.gif")}, 8, 8, 5, 2, fps=10)   # by the frames' durations
    assert ((timed.mean((0, 2, 3)) + 1) * 127.5).round().int().tolist() == [20, 80, 80, 80, 140]


def test_release_files_widths_past_the_probes_are_checked_as_they_load(features, tmp_path, monkeypatch):
    path = copy_features(features, tmp_path / "f")
    lines = [{k: v for k, v in json.loads(line).items() if k not in ("latent_shape", "text_dims")}
             for line in open(path)]                            # as the release writes them: nothing recorded
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in lines)
    monkeypatch.setattr(vd, "TEXT_PROBES", 1)
    ds = vd.FeatureDataset(path)
    assert len(ds) == 4 and (ds.text_dim, ds.pooled_dim) == (TEXT_DIM, POOLED_DIM)   # from the first header
    text = ds.entries[2]["text_fea"]
    torch.save(dict(prompt_embed=torch.zeros(1, 3, 12), prompt_attention_mask=torch.ones(1, 3, dtype=torch.bool),
                    pooled_prompt_embed=torch.zeros(1, POOLED_DIM)), text)
    with pytest.raises(vd.BadFeature, match=f"{text}: 12- and {POOLED_DIM}-wide"):
        ds.load(2)
