"""Real data (video_data.py) on tiny files the tests write: annotation layouts, clip reading
(cover-crop, 1 + f*k frames, bad files), extraction (round trip, sharding, resume after a kill,
atomic files), extracted and release-format features, refusal of an untrusted pickle.
Legend: one clip [3, F, H, W] in [-1, 1]; latents [B, C, T, h, w]; tokens [B, L, D]."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
import torch

import text_to_video
import vae
import video_data as vd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, FRAMES = 32, 9          # toy VAE: temporal factor 2, spatial 4 -> 5 latent frames of 8x8
TEXT_DIM, POOLED_DIM = 16, 8


def write_video(path, n, height=40, width=56):
    """n frames whose brightness rises with the frame index (frame j is 20 + 10 j grey)."""
    frames = np.zeros((n, height, width, 3), np.uint8) + (20 + 10 * np.arange(n, dtype=np.uint8))[:, None, None, None]
    iio.imwrite(path, frames, plugin="pyav", codec="libx264", fps=8)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder with good videos (17 and 6 frames), a portrait PNG, a too-short video (2 frames),
    a corrupt .mp4 and an annotation file naming them plus a missing one (relative paths)."""
    root = tmp_path_factory.mktemp("media")
    write_video(root / "long.mp4", 17)
    write_video(root / "short.mp4", 6)
    write_video(root / "tiny.mp4", 2)
    image = np.zeros((40, 20, 3), np.uint8)
    image[10:30] = 255                                   # white middle half, black top and bottom
    iio.imwrite(root / "portrait.png", image)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(2000))
    entries = [{"video": "long.mp4", "text": "a red circle moving left"},
               {"video": "short.mp4", "text": "a blue square moving up"},
               {"image": "portrait.png", "text": "a white band"},
               {"video": "tiny.mp4", "text": "too short"},
               {"video": "corrupt.mp4", "text": "corrupt"},
               {"video": "missing.mp4", "text": "missing"}]
    (root / "ann.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return root


def entry(media, name):
    return next(e for e in vd.load_entries(str(media / "ann.jsonl")) if vd.media_path(e).endswith(name))


def models():
    torch.manual_seed(0)
    return (vae.CausalVAE(vae.VAE_SIZES["toy"]).eval().requires_grad_(False),
            text_to_video.ToyTextEncoder(TEXT_DIM, POOLED_DIM).requires_grad_(False))


def test_load_entries_jsonl_and_folder(media, tmp_path, capsys):
    entries = vd.load_entries(str(media / "ann.jsonl"))
    assert len(entries) == 6 and entries[0] == {"video": str(media / "long.mp4"), "text": "a red circle moving left"}
    assert entries[2] == {"image": str(media / "portrait.png"), "text": "a white band"}
    (tmp_path / "sub").mkdir()
    write_video(tmp_path / "sub" / "b.mp4", 3)
    (tmp_path / "sub" / "b.txt").write_text("a clip\n")
    iio.imwrite(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "a.txt").write_text("an image")
    write_video(tmp_path / "uncaptioned.mp4", 3)
    assert vd.load_entries(str(tmp_path)) == [{"image": str(tmp_path / "a.png"), "text": "an image"},
                                              {"video": str(tmp_path / "sub" / "b.mp4"), "text": "a clip"}]
    assert "1 videos/images" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"video": "a.mp4", "text": "x"}\n{"video": "b.mp4"\n')
    assert len(vd.load_entries(str(tmp_path / "broken.jsonl"))) == 1            # one bad line of two: skipped
    assert "broken.jsonl:2: not a JSON object" in capsys.readouterr().err
    (tmp_path / "broken.jsonl").write_text('{"video": "b.mp4"\n')
    with pytest.raises(SystemExit, match=r"1 of 1 entries of .*broken.jsonl are bad"):
        vd.load_entries(str(tmp_path / "broken.jsonl"))
    with pytest.raises(SystemExit, match="no annotation file"):
        vd.load_entries(str(tmp_path / "nothing.jsonl"))


def test_read_clip_lengths_crop_and_range(media):
    long, short, image = entry(media, "long.mp4"), entry(media, "short.mp4"), entry(media, "portrait.png")
    clip = vd.read_clip(long, SIZE, SIZE, FRAMES, 2)
    assert clip.shape == (3, FRAMES, SIZE, SIZE) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    means = (clip.mean((0, 2, 3)) + 1) * 127.5                                  # frame j was 20 + 10 j grey
    assert torch.allclose(means, 20 + 10 * torch.arange(FRAMES).float(), atol=3)
    assert vd.read_clip(long, 16, 24, 17, 8).shape == (3, 17, 16, 24)          # 1 + 8*2: all 17 frames
    assert vd.read_clip(short, SIZE, SIZE, FRAMES, 2).shape[1] == 5            # 6 frames -> 1 + 2*2
    assert vd.read_clip(short, SIZE, SIZE, 17, 4).shape[1] == 5                # at least 1 + f frames: kept
    # cover then centre-crop: 40x20 -> 64x32, rows 16..48 are the white middle half of the original
    im = vd.read_clip(image, SIZE, SIZE, FRAMES, 2)
    assert im.shape == (3, 1, SIZE, SIZE) and im[:, :, 2:-2].min() > 0.9
    wide = vd.read_clip(image, 8, 32, FRAMES, 2)                               # 40x20 -> 64x32 -> rows 28..36
    assert wide.shape == (3, 1, 8, 32) and wide.min() > 0.9
    with pytest.raises(ValueError, match="not 1 \\+ 2\\*k"):
        vd.read_clip(long, SIZE, SIZE, 8, 2)


@pytest.mark.parametrize("name, reason", [("tiny.mp4", "too short"), ("corrupt.mp4", "unreadable"),
                                          ("missing.mp4", "missing file")])
def test_bad_files_raise_badclip_in_one_line(media, name, reason):
    with pytest.raises(vd.BadClip) as e:
        vd.read_clip(entry(media, name), SIZE, SIZE, FRAMES, 2)
    assert str(e.value).startswith(reason) and name in str(e.value) and "\n" not in str(e.value)


def test_short_video_refused_when_full_length_is_required(media):
    with pytest.raises(vd.BadClip, match="too short .*6 frames, needs at least 9"):
        vd.read_clip(entry(media, "short.mp4"), SIZE, SIZE, FRAMES, 2, min_frames=FRAMES)
    with pytest.raises(vd.BadClip, match="too short .*6 frames, needs at least 9"):
        vd.read_clip(entry(media, "short.mp4"), SIZE, SIZE, 17, 8)             # f = 8: fewer than 1 + 8


def extract_all(entries, out, world=3):
    """Every rank's share, one after the other, then the merged jsonl."""
    model, text = models()
    for rank in range(world):
        vd.extract(entries, str(out), model, text, SIZE, SIZE, FRAMES, rank=rank, world=world, progress=False)
    return vd.merge_shards(str(out), world)


def test_extract_round_trip_sharded(media, tmp_path, capsys):
    entries = vd.load_entries(str(media / "ann.jsonl"))   # 3 ranks, 1 bad file in each share of 2
    path = extract_all(entries, tmp_path / "feat")
    err = capsys.readouterr().err
    assert all(f"warning: {why}" in err for why in ("too short", "unreadable", "missing file"))
    lines = [json.loads(line) for line in open(path)]
    assert sorted(vd.media_path(e) for e in lines) == sorted(
        str(media / n) for n in ("long.mp4", "short.mp4", "portrait.png"))  # the 3 bad ones skipped
    assert not list((tmp_path / "feat").rglob("*.tmp"))
    model, text = models()
    for e in vd.load_entries(path):                                 # relative paths resolve to out_dir
        clip = vd.read_clip(e, SIZE, SIZE, FRAMES, 2)
        expected = model.normalize(model.encode(clip[None]))        # [1, 4, T, 8, 8]
        latent = torch.load(e["latent"], weights_only=True)
        assert latent.shape == expected.shape == (1, 4, e["latent_frames"], 8, 8)
        torch.testing.assert_close(latent.float(), expected, atol=0.02, rtol=0.01)  # stored in bf16
        feats = torch.load(e["text_fea"], weights_only=True)
        tokens, mask, pooled = text([e["text"]])
        assert set(feats) == {"prompt_embed", "prompt_attention_mask", "pooled_prompt_embed"}
        torch.testing.assert_close(feats["prompt_embed"].float(), tokens, atol=0.02, rtol=0.01)
        assert torch.equal(feats["prompt_attention_mask"], mask)
        torch.testing.assert_close(feats["pooled_prompt_embed"].float(), pooled, atol=0.02, rtol=0.01)

    ds = vd.FeatureDataset(path)
    assert len(ds) == 3 and {T: len(i) for T, i in ds.buckets.items()} == {5: 1, 3: 1, 1: 1}
    assert (ds.latent_channels, ds.latent_size, ds.text_dim, ds.pooled_dim) == (4, (8, 8), TEXT_DIM, POOLED_DIM)
    b = ds.batch(ds.buckets[5] * 2)
    assert b["latents"].shape == (2, 4, 5, 8, 8) and b["pooled"].shape == (2, POOLED_DIM)
    assert b["text"].shape == (2, 5, TEXT_DIM) and b["text_mask"].all()    # "a red circle moving left"
    with pytest.raises(ValueError, match="one bucket"):
        ds.batch([ds.buckets[5][0], ds.buckets[1][0]])
    images = ds.batch([ds.buckets[5][0], ds.buckets[3][0], ds.buckets[1][0]], latent_frames=1)
    assert images["latents"].shape == (3, 4, 1, 8, 8)
    assert torch.equal(images["latents"][0], b["latents"][0, :, :1])    # a video's first latent: an image
    null_tokens, null_mask, null_pooled = ds.null_text()
    _, _, pooled = text([""])
    assert null_tokens.shape == (1, 1, TEXT_DIM) and not null_mask.any()
    torch.testing.assert_close(null_pooled, pooled, atol=0.02, rtol=0.01)
    drawn = ds.draw(4, torch.Generator().manual_seed(0), latent_frames=3)
    assert drawn["latents"].shape == (4, 4, 3, 8, 8)


def test_text_padded_to_longest_caption_with_mask_false(media, tmp_path):
    long = entry(media, "long.mp4")                                # the same clip with two captions
    entries = [dict(long, text="one two three four five six"), dict(long, text="one")]
    model, text = models()
    vd.extract(entries, str(tmp_path), model, text, SIZE, SIZE, FRAMES, progress=False)
    ds = vd.FeatureDataset(vd.merge_shards(str(tmp_path), 1))
    assert len(os.listdir(tmp_path / "latents")) == 1              # one file per video, not per line
    b = ds.batch([0, 1])
    assert b["text"].shape == (2, 6, TEXT_DIM)
    assert b["text_mask"].tolist() == [[True] * 6, [True] + [False] * 5]
    assert b["text"][1, 1:].abs().max() == 0


def test_extract_resumes_skipping_existing_outputs(media, tmp_path):
    entries = vd.load_entries(str(media / "ann.jsonl"))[:3]
    model, text = models()
    calls = []
    encode = model.encode
    model.encode = lambda x, **kw: calls.append(x.shape[2]) or encode(x, **kw)
    vd.extract(entries[:2], str(tmp_path), model, text, SIZE, SIZE, FRAMES, progress=False)  # "interrupted"
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "latents").iterdir()}
    (tmp_path / "latents" / "stale.pt.rank0.tmp").write_bytes(b"half a file")   # what a kill leaves
    (tmp_path / "extracted.rank0.jsonl.rank0.tmp").write_text("{")
    calls.clear()
    shard = vd.extract(entries, str(tmp_path), model, text, SIZE, SIZE, FRAMES, progress=False)
    assert calls == [1]                                               # only the image was encoded again
    assert all((tmp_path / "latents" / n).stat().st_mtime_ns == t for n, t in first.items())
    assert not list(tmp_path.rglob("*.tmp"))
    path = vd.merge_shards(str(tmp_path), 1)
    assert [vd.media_path(e) for e in vd.load_entries(path)] == [vd.media_path(e) for e in entries]
    assert [e["latent_frames"] for e in vd.load_entries(path)] == [5, 3, 1]
    assert shard.endswith("extracted.rank0.jsonl")


KILLED_RUN = """
import sys, time, torch
sys.path.insert(0, {repo!r})
import text_to_video, vae, video_data as vd
torch.manual_seed(0)
model = vae.CausalVAE(vae.VAE_SIZES["toy"]).eval().requires_grad_(False)
encode = model.encode
def slow(x, **kw):
    time.sleep(0.5)              # time for the test to kill it between two clips
    return encode(x, **kw)
model.encode = slow
vd.extract(vd.load_entries({ann!r}), {out!r}, model, text_to_video.ToyTextEncoder({td}, {pd}), {size}, {size}, {frames},
           progress=False)
"""


def test_extract_killed_half_way_then_rerun_completes(media, tmp_path):
    lines = [{"video": str(media / "long.mp4"), "text": "long"},
             {"image": str(media / "portrait.png"), "text": "image"}]
    for i in range(4):                                               # 6 distinct files in all
        shutil.copy(media / "short.mp4", tmp_path / f"copy{i}.mp4")
        lines.append({"video": str(tmp_path / f"copy{i}.mp4"), "text": f"copy {i}"})
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps(e) + "\n" for e in lines))
    out = tmp_path / "out"
    script = KILLED_RUN.format(repo=REPO, ann=str(ann), out=str(out), td=TEXT_DIM, pd=POOLED_DIM,
                               size=SIZE, frames=FRAMES)
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and len(list((out / "latents").glob("*.pt"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the extraction ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "latents").glob("*.pt")}
    assert 2 <= len(done) < 6 and not (out / "extracted.jsonl").exists()

    model, text = models()
    vd.extract(vd.load_entries(str(ann)), str(out), model, text, SIZE, SIZE, FRAMES, progress=False)
    path = vd.merge_shards(str(out), 1)
    assert all((out / "latents" / n).stat().st_mtime_ns == t for n, t in done.items())  # kept, not redone
    assert not list(out.rglob("*.tmp"))
    extracted = vd.load_entries(path)
    assert [e["text"] for e in extracted] == [e["text"] for e in lines]
    ds = vd.FeatureDataset(path)
    assert len(ds) == 6 and sorted(ds.buckets) == [1, 3, 5]
    for i, e in enumerate(extracted):                                # every latent is the clip's, whole
        clip = vd.read_clip(e, SIZE, SIZE, FRAMES, 2)
        torch.testing.assert_close(ds.batch([i])["latents"], model.normalize(model.encode(clip[None])),
                                   atol=0.02, rtol=0.01)


def test_mostly_bad_data_stops_with_one_line(media, tmp_path):
    entries = vd.load_entries(str(media / "ann.jsonl"))
    model, text = models()
    with pytest.raises(SystemExit) as e:   # 1 good of 4: the missing one at start-up, the others as read
        vd.extract(entries[2:], str(tmp_path), model, text, SIZE, SIZE, FRAMES, progress=False)
    assert "3 of 4" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="2 of 3 videos/images .missing files. are bad"):  # before any work
        vd.extract([entries[0], entries[5], entries[5]], str(tmp_path / "b"), model, text, SIZE, SIZE, FRAMES,
                   progress=False)
    assert not (tmp_path / "b" / "latents").exists() or not os.listdir(tmp_path / "b" / "latents")


def release_files(root, n=3, frames=(2, 2, 3), length=128):
    """Feature files as the release's extraction writes them: float latents [1, 16, T, h, w] and
    dicts with a 0/1 int mask of T5's 128 tokens, and an annotation file pointing at them."""
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(n):
        torch.save(torch.randn(1, 16, frames[i], 4, 6, generator=g), root / f"lat{i}.pt")
        mask = torch.zeros(1, length, dtype=torch.int64)
        mask[0, :5 + i] = 1
        torch.save(dict(prompt_embed=torch.randn(1, length, 64, generator=g), prompt_attention_mask=mask,
                        pooled_prompt_embed=torch.randn(1, 2048, generator=g)), root / f"txt{i}.pt")
        lines.append({"video": f"v{i}.mp4", "text": f"caption {i}", "latent": f"lat{i}.pt", "text_fea": f"txt{i}.pt"})
    (root / "release.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return root / "release.jsonl"


def test_release_format_features_load_with_the_release_normalisation(tmp_path):
    """The release's extraction stores raw VAE samples (its pipeline normalises them as it trains):
    an entry without this repo's record ("latent_frames") is normalised with the release's shift
    and scale as it loads, frame 0 apart; the text features load as they are."""
    ds = vd.FeatureDataset(str(release_files(tmp_path)))
    assert ds.buckets == {2: [0, 1], 3: [2]}                          # read from the files' headers
    assert (ds.latent_channels, ds.latent_size, ds.text_dim, ds.pooled_dim) == (16, (4, 6), 64, 2048)
    b = ds.batch([0, 1])
    feats = [torch.load(tmp_path / f"txt{i}.pt", weights_only=True) for i in (0, 1)]
    raw = torch.cat([torch.load(tmp_path / f"lat{i}.pt") for i in (0, 1)])     # [2, 16, 2, 4, 6]
    torch.testing.assert_close(b["latents"][:, :, 0], (raw[:, :, 0] - 0.1490) / 1.8415)
    torch.testing.assert_close(b["latents"][:, :, 1], (raw[:, :, 1] + 0.2343) / 3.0986)
    assert torch.equal(b["text"], torch.cat([f["prompt_embed"] for f in feats]))
    assert b["text_mask"].dtype == torch.bool and b["text_mask"].sum(1).tolist() == [5, 6]
    assert torch.equal(b["pooled"], torch.cat([f["pooled_prompt_embed"] for f in feats]))
    with pytest.raises(SystemExit, match="null_text.pt"):            # the release has none: say so
        ds.null_text()


def test_missing_feature_files_skipped_then_mostly_missing_stops(tmp_path, capsys):
    ann = release_files(tmp_path)
    os.remove(tmp_path / "lat1.pt")
    ds = vd.FeatureDataset(str(ann))
    assert len(ds) == 2 and "1 of 3 entries" in capsys.readouterr().err
    os.remove(tmp_path / "txt2.pt")
    with pytest.raises(SystemExit, match="2 of 3 entries"):
        vd.FeatureDataset(str(ann))


class Payload:
    """Unpickling this runs a shell command (what an untrusted .pt can do to torch.load(weights_only=False))."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("which", ["latent", "text_fea"])
def test_untrusted_pickle_is_refused_without_running(tmp_path, which, capsys):
    ann = release_files(tmp_path)
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), tmp_path / "evil.pt")
    lines = [json.loads(line) for line in open(ann)]
    lines[0][which] = "evil.pt"
    ann.write_text("".join(json.dumps(e) + "\n" for e in lines))
    assert len(vd.FeatureDataset(str(ann))) == 2                      # named and skipped, never run
    assert f"warning: refused {tmp_path / 'evil.pt'}" in capsys.readouterr().err
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)              # proof the file was dangerous
    assert marker.exists()


def test_imageio_ffmpeg_reads_the_same_frames_without_av(media, monkeypatch):
    clip = vd.read_clip(entry(media, "long.mp4"), SIZE, SIZE, FRAMES, 2)
    monkeypatch.setitem(sys.modules, "av", None)                      # as if PyAV were not installed
    assert torch.equal(vd.read_clip(entry(media, "long.mp4"), SIZE, SIZE, FRAMES, 2), clip)
    with pytest.raises(vd.BadClip, match="unreadable"):
        vd.read_clip(entry(media, "corrupt.mp4"), SIZE, SIZE, FRAMES, 2)


def test_cut_to_max_latent_frames_and_dataloader(tmp_path):
    ann = release_files(tmp_path, frames=(2, 3, 5))
    ds = vd.FeatureDataset(str(ann), max_latent_frames=3)
    assert ds.buckets == {2: [0], 3: [1, 2]}                         # the 5-frame clip joins the 3s
    full = torch.load(tmp_path / "lat2.pt", weights_only=True)
    # its first 3 latent frames (release files: normalised as they load)
    assert torch.equal(ds[2]["latent"], vae.normalize_release(full[0, :, :3]))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=list(ds.buckets.values()), collate_fn=ds.collate)
    shapes = [b["latents"].shape for b in loader]
    assert shapes == [(1, 16, 2, 4, 6), (2, 16, 3, 4, 6)]


def test_extraction_needs_media_and_caption(tmp_path):
    model, text = models()
    with pytest.raises(SystemExit, match="extraction needs"):
        vd.extract([{"latent": "a.pt", "text": "x"}], str(tmp_path), model, text, SIZE, SIZE, FRAMES, progress=False)


@pytest.mark.parametrize("no_av", [False, True])
def test_resampled_to_a_frame_rate(media, monkeypatch, no_av):
    """long.mp4 is 17 frames at 8 fps (frame j: 20 + 10 j grey): at 4 fps every other frame, at
    16 fps each frame twice, so `frames` is a duration whatever the file's rate."""
    if no_av:
        monkeypatch.setitem(sys.modules, "av", None)
    long = entry(media, "long.mp4")
    def grey(clip):                                                  # the source frame index
        return ((clip.mean((0, 2, 3)) + 1) * 127.5 - 20) / 10
    torch.testing.assert_close(grey(vd.read_clip(long, SIZE, SIZE, FRAMES, 2, fps=4)),
                               torch.arange(0, 17, 2).float(), atol=0.3, rtol=0)
    torch.testing.assert_close(grey(vd.read_clip(long, SIZE, SIZE, FRAMES, 2, fps=16)),
                               torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4]).float(), atol=0.3, rtol=0)
    with pytest.raises(vd.BadClip, match="3 frames, needs at least 5"):    # 6 frames at 8 fps -> 3 at 4
        vd.read_clip(entry(media, "short.mp4"), SIZE, SIZE, FRAMES, 2, min_frames=5, fps=4)


def test_a_truncated_feature_file_is_named_and_skipped(tmp_path, capsys):
    ann = release_files(tmp_path)
    data = (tmp_path / "txt1.pt").read_bytes()
    (tmp_path / "txt1.pt").write_bytes(data[:len(data) // 2])
    ds = vd.FeatureDataset(str(ann))                                  # the scan reads every header
    err = capsys.readouterr().err
    assert len(ds) == 2 and f"warning: cannot read {tmp_path / 'txt1.pt'}: " in err and "1 of 3 entries" in err
