"""sample.py: readable mp4 and gif files of the requested frame count and size, image-to-video
keeps the given first frame, continuation keeps the given clip, and bad input gets a one-line
error with no partial output file."""
import dataclasses
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

import common
import config
import sample
import train

FAST = ["--steps=1,1,1", "--steps_later=1,1,1"]  # the pixel checkpoint (K = 3)
FAST_LATENT = ["--steps=1,1", "--steps_later=1,1"]  # the tiny preset as it is (K = 2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cfg = dataclasses.replace(config.parse_args(["--preset=tiny"]), out_dir=str(out), max_steps=1, width=32,
                              depth=1, heads=1, batch_size=6, frames=3, eval_captions=0,
                              vae_ckpt="", vae_steps=0, patch=4, K=3, stage_ratio="1,1,1", sample_steps="1,1,1",
                              sample_steps_later="1,1,1", data_pool=0)  # pixel space: exact frames in and out
    train.train(cfg, quiet=True)
    return str(out / "ckpt.pt")


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory):
    """The tiny preset with its own VAE (--vae_ckpt=): a VAE first, then the video model on its latents (one step each)."""
    out = tmp_path_factory.mktemp("tiny_latent")
    cfg = dataclasses.replace(config.parse_args(["--preset=tiny"]), out_dir=str(out), max_steps=1, vae_ckpt="", vae_steps=1,
                              width=32, depth=1, heads=1, batch_size=3, frames=5, eval_captions=0, data_pool=6)
    train.train(cfg, quiet=True)
    return str(out / "ckpt.pt")


def run(*argv):
    sample.main(list(argv))


@pytest.mark.parametrize("ext", ["gif", "mp4"])
def test_writes_readable_video_of_requested_frames_and_size(ckpt, tmp_path, ext):
    out = tmp_path / f"v.{ext}"
    run(f"--ckpt={ckpt}", "--prompt=a red circle moving left", f"--out={out}", "--frames=5", *FAST)
    frames = imageio.mimread(str(out))
    assert len(frames) == 5 and frames[0].shape[:2] == (32, 32)
    assert not [f for f in os.listdir(tmp_path) if f != f"v.{ext}"]  # no temp file left behind


def test_prompt_file_writes_one_video_per_prompt(ckpt, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\n\na blue square moving up\n")
    run(f"--ckpt={ckpt}", f"--prompts={prompts}", f"--out={tmp_path / 'vids'}", "--frames=2", *FAST)
    assert len(os.listdir(tmp_path / "vids")) == 2


def test_same_seed_same_video(ckpt, tmp_path):
    net, cfg, vae = sample.load(ckpt)
    a = sample.generate(net, ["a red circle moving left"], cfg, 2, seed=3, steps=[1, 1, 1], steps_later=[1, 1, 1],
                        progress=False)
    b = sample.generate(net, ["a red circle moving left"], cfg, 2, seed=3, steps=[1, 1, 1], steps_later=[1, 1, 1],
                        progress=False)
    assert torch.equal(a, b)


def test_negative_prompt_takes_the_empty_captions_place(ckpt):
    """--negative_prompt is the caption of CFG's unconditional half: "" is the default, another changes the video."""
    net, cfg, _ = sample.load(ckpt)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # one training step leaves the text without effect (adaLN-Zero): wake every weight
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))

    def gen(**kw):
        return sample.generate(net, ["a red circle moving left"], cfg, 2, seed=3, steps=[1] * 3, steps_later=[1] * 3,
                               guidance=4.0, video_guidance=4.0, progress=False, **kw)
    base = gen()
    assert torch.equal(gen(negative_prompt=""), base)
    assert not torch.equal(gen(negative_prompt="a blue square moving up"), base)


def test_release_preset_sets_what_is_not_given():
    o = sample.parse(["--ckpt=x.pt", "--preset=release", "--guidance=3"])
    assert (o["steps"], o["steps_later"], o["guidance"], o["video_guidance"]) == ("20,20,20", "10,10,10", "3", "5")
    assert o["negative_prompt"] == sample.RELEASE_NEGATIVE_PROMPT and o["prompt_suffix"].startswith(", hyper quality")
    with pytest.raises(SystemExit, match="unknown --preset=fast"):
        sample.parse(["--preset=fast"])


def test_image_to_video_keeps_the_first_frame(ckpt, tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    img[10:20, 12:22] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "first.png")
    out = tmp_path / "i2v.gif"
    run(f"--ckpt={ckpt}", "--prompt=a blue square moving up", f"--image={tmp_path / 'first.png'}",
        f"--out={out}", "--frames=3", *FAST)
    frames = imageio.mimread(str(out))
    assert len(frames) == 3 and np.abs(frames[0][..., :3].astype(int) - img).max() <= 1


def test_wrong_image_size_is_resized_with_a_note(ckpt, tmp_path, capsys):
    Image.new("RGB", (40, 24), "red").save(tmp_path / "big.png")
    run(f"--ckpt={ckpt}", "--prompt=a red square moving up", f"--image={tmp_path / 'big.png'}",
        f"--out={tmp_path / 'r.gif'}", "--frames=2", *FAST)
    assert "resizing" in capsys.readouterr().out and (tmp_path / "r.gif").exists()


def test_video_continuation_keeps_the_clip(ckpt, tmp_path):
    from toy import data
    video, _ = data.shapes_batch(1, frames=2, generator=0)                    # pure colours: gif-exact
    clip = common.to_uint8(video[0])
    imageio.mimwrite(tmp_path / "clip.gif", list(clip), duration=100, loop=0)
    given = np.stack(imageio.mimread(str(tmp_path / "clip.gif")))[..., :3]
    out = tmp_path / "cont.gif"
    run(f"--ckpt={ckpt}", "--prompt=a red circle moving left", f"--video={tmp_path / 'clip.gif'}",
        f"--out={out}", "--frames=4", *FAST)
    frames = np.stack(imageio.mimread(str(out)))[..., :3]
    assert len(frames) == 4 and np.abs(frames[:2].astype(int) - given).max() <= 1


def foreign_checkpoint(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, path)
    return path


@pytest.mark.parametrize("make_args,msg", [
    (lambda c, t: [f"--ckpt={t / 'missing.pt'}", "--prompt=x", f"--out={t / 'o.gif'}"], "no video checkpoint at"),
    (lambda c, t: [f"--ckpt={foreign_checkpoint(t)}", "--prompt=x", f"--out={t / 'o.gif'}"], "not a video checkpoint"),
    (lambda c, t: [f"--ckpt={c}", "--prompt=x", f"--out={t / 'no_dir' / 'o.gif'}"], "cannot write"),
    (lambda c, t: [f"--ckpt={c}", "--prompt=x", f"--out={t / 'o.avi'}"], "ending in .gif or .mp4"),
    (lambda c, t: [f"--ckpt={c}", f"--prompts={t / 'empty.txt'}", f"--out={t / 'd'}"], "has no prompts"),
    (lambda c, t: [f"--ckpt={c}", "--prompt=x", f"--out={t / 'o.gif'}", "--steps=1,1"], "needs 3 positive"),
    (lambda c, t: [f"--ckpt={c}", "--prompt=x", f"--out={t / 'o.gif'}", "--seed=abc"], "--seed expects int"),
    (lambda c, t: [f"--ckpt={c}", "--prompt=x", f"--out={t / 'o.gif'}", "--image=nope.png"], "cannot read image"),
    (lambda c, t: [f"--ckpt={c}", "--prompt=x", f"--out={t / 'o.gif'}", "--bogus=1"], "unknown option --bogus"),
])
def test_bad_input_one_line_error_and_no_output(ckpt, tmp_path, make_args, msg):
    (tmp_path / "empty.txt").write_text("\n \n")
    before = set(os.listdir(tmp_path))
    with pytest.raises(SystemExit, match=msg) as e:
        run(*make_args(ckpt, tmp_path))
    assert "\n" not in str(e.value)
    assert set(os.listdir(tmp_path)) - before <= {"foreign.pt"}  # nothing written


def test_latent_checkpoint_writes_video_and_keeps_a_given_first_frame(latent_ckpt, tmp_path):
    img = np.zeros((32, 32, 3), np.uint8)
    img[10:20, 12:22] = (255, 255, 0)
    Image.fromarray(img).save(tmp_path / "first.png")
    for ext in ("mp4", "gif"):  # mp4 keeps every frame; gif keeps colours exactly (and merges repeats)
        run(f"--ckpt={latent_ckpt}", "--prompt=a yellow square moving up", f"--image={tmp_path / 'first.png'}",
            f"--out={tmp_path / ('v.' + ext)}", "--frames=5", *FAST_LATENT)
    frames = imageio.mimread(str(tmp_path / "v.mp4"))
    assert len(frames) == 5 and frames[0].shape[:2] == (32, 32)
    first = imageio.mimread(str(tmp_path / "v.gif"))[0][..., :3]
    assert np.abs(first.astype(int) - img).max() <= 1  # exact, not a VAE round trip
    with pytest.raises(SystemExit, match="1 \\+ 2\\*k"):  # a 2x-in-time VAE makes 1 + 2k frames
        run(f"--ckpt={latent_ckpt}", "--prompt=a red circle moving left", f"--out={tmp_path / 'w.gif'}",
            "--frames=4", *FAST_LATENT)
    assert not (tmp_path / "w.gif").exists()


def test_guidance_sweep_prints_a_row_per_pair(latent_ckpt, capsys):
    from toy import sweep_guidance
    sweep_guidance.main([f"--ckpt={latent_ckpt}", "--pairs=2:2,3:1", "--seeds=1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[-2:]]
    assert [r[:3] for r in rows] == [["all", "2", "2"], ["all", "3", "1"]] and all(len(r) == 9 for r in rows)
    with pytest.raises(SystemExit, match="guidance:video_guidance"):
        sweep_guidance.main([f"--ckpt={latent_ckpt}", "--pairs=2"])
    # history truncation: a row per --max_history value
    sweep_guidance.main([f"--ckpt={latent_ckpt}", "--pairs=2:2", "--seeds=1", "--max_history=0,1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[-2:]]
    assert [r[0] for r in rows] == ["all", "1"]
    with pytest.raises(SystemExit, match="--max_history must be >= 0"):
        sweep_guidance.main([f"--ckpt={latent_ckpt}", "--max_history=-1"])


def test_size_diagnosis_prints_a_row_per_frame_and_the_decoder_tolerance(latent_ckpt, capsys):
    from toy import diagnose_size
    diagnose_size.main([f"--ckpt={latent_ckpt}", "--seeds=1", "--noise=0,0.5", "--image"])
    out = capsys.readouterr().out.splitlines()
    frames = out[out.index(next(line for line in out if line.lstrip().startswith("frame"))) + 1:][:5]
    assert [int(line.split()[0]) for line in frames] == [0, 1, 2, 3, 4]  # the fixture's 5 frames
    assert frames[0].split()[1:] == ["1.000", "0.000", "-", "0.000"]  # --image: the data's own first frames
    tolerance = out[-2:]
    assert [float(line.split()[0]) for line in tolerance] == [0.0, 0.5]
    with pytest.raises(SystemExit, match="--seeds wants integers"):
        diagnose_size.main([f"--ckpt={latent_ckpt}", "--seeds=a"])


def test_a_toy_checkpoint_decodes_with_another_vae_of_its_shape(latent_ckpt, ckpt, tmp_path):
    """--vae_ckpt replaces the VAE a toy checkpoint holds (toy/lora.py's VAE taught cyan); another shape is
    refused, and so is a VAE for a pixel-space checkpoint."""
    import vae as vae_module
    shipped = common.load_vae(config.QUICK_START_VAE)
    _, _, own = sample.load(latent_ckpt)
    _, _, other = sample.load(latent_ckpt, vae_ckpt=config.QUICK_START_VAE)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), shipped.state_dict().values()))
    assert not torch.equal(own.last_layer, other.last_layer)
    wider = dataclasses.replace(shipped.cfg, latent_channels=shipped.cfg.latent_channels + 1)
    common.save_torch(str(tmp_path / "wider.pt"), dict(kind="causal-vae", config=dataclasses.asdict(wider),
                                                       model=vae_module.CausalVAE(wider).state_dict()))
    with pytest.raises(SystemExit, match="not shaped as"):
        sample.load(latent_ckpt, vae_ckpt=str(tmp_path / "wider.pt"))
    with pytest.raises(SystemExit, match="pixel space"):
        sample.load(ckpt, vae_ckpt=config.QUICK_START_VAE)
