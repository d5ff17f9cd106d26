"""The loop at scale, on CPU: each rank's disjoint shard of the bucketed epochs (feature_loader.py),
sharded checkpoints that resume on another number of processes (checkpoint.py), SIGTERM under
torchrun (every rank finishes its micro-step and saves; the resumed run gives the uninterrupted
losses), metrics.jsonl (metrics.py), the dry run's FLOPs and toy/gpu_check.py's CPU-checkable parts.
Two gloo processes run the tiny full-shaped model of tests/test_full.py on its extracted features."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import common
import config
import feature_loader
import metrics
import sample
import train
from test_full import TINY, _free_port, extracted, load, tiny_text_encoder  # noqa: F401 - extracted: a fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASE = ["--preset=full", "--phase=2", "--init_from=none"]


def settings(data, out, *argv):
    return config.parse_args(TINY + PHASE + [f"--data={data}", f"--out_dir={out}", *argv])


# ---------------------------------------------------------------- the epochs and their shards

def test_each_rank_reads_a_disjoint_shard_and_an_epoch_covers_every_clip():
    buckets = {1: list(range(0, 7)), 3: list(range(7, 20)), 5: list(range(20, 23))}
    per = feature_loader.batches_per_epoch(buckets, 4)
    assert per == 2 + 4 + 1
    epoch = feature_loader.epoch_batches(buckets, 4, seed=0, epoch=0)
    assert len(epoch) == per and all(len(b) == 4 for b in epoch)
    assert {i for b in epoch for i in b} == set(range(23))  # every clip, each batch from one bucket
    assert all(len({next(T for T, ids in buckets.items() if i in ids) for i in b}) == 1 for b in epoch)
    assert epoch != feature_loader.epoch_batches(buckets, 4, seed=0, epoch=1)  # a new permutation an epoch
    ranks = [feature_loader.ShardedBatches(buckets, 4, 0, r, 3) for r in range(3)]
    drawn = [[b for _, b in zip(range(2), iter(s))] for s in ranks]  # two micro-steps of three ranks
    assert [b for step in zip(*drawn) for b in step] == epoch[:6]  # rank r reads batches pos + r
    # the position after a few micro-steps: two processes resume where three stopped
    position = (0, 0)
    for _ in range(2):
        position = feature_loader.advance(position, per, 3)
    assert position == (1, 0)  # 7 batches: a third round of three does not fit
    resumed = feature_loader.ShardedBatches(buckets, 4, 0, 1, 2, position)
    assert next(iter(resumed)) == feature_loader.epoch_batches(buckets, 4, 0, 1)[1]


# ---------------------------------------------------------------- sharded checkpoints, metrics

def _worker(rank, port, data, out, vae_ckpt):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    task = train.FeatureVideo(settings(data, out, "--batch_size=1", "--workers=1"))
    task.start_data(rank, 2)
    # an epoch of 6 one-clip batches: 3 micro-steps a rank; which clip is which: its latents
    seen = [task.stream.next()["latents"].sum().item() for _ in range(3)]
    everyone = [None, None]
    torch.distributed.all_gather_object(everyone, seen)
    # the bf16 policy of FSDP on CUDA (common.shard), here on the CPU: computes in bf16, keeps fp32
    # shards and reduces fp32 gradients
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    common.shard([net], torch.nn.Linear, bf16=True)
    seen = []
    net[0].register_forward_pre_hook(lambda m, x: seen.append(m.weight.dtype))
    y = net(torch.randn(4, 8))
    y.float().square().mean().backward()
    dtypes = [y.dtype, seen[0], net[0].weight.dtype, net[0].weight.grad.dtype]
    if rank == 0:
        torch.save(dict(seen=everyone, dtypes=dtypes), os.path.join(out, "seen.pt"))
    import text_encoders
    text_encoders.load_text_encoder = tiny_text_encoder  # the one that extracted the features
    train.train(settings(data, out, "--fsdp=true", "--max_steps=2", "--peak_tflops=0.001", "--sample_every=2",
                         "--text_encoder=tiny", f"--vae_ckpt={vae_ckpt}", "--sample_steps=1,1,1",
                         "--sample_steps_later=1,1,1"), quiet=True)


def test_two_gloo_ranks_read_disjoint_shards_and_sharded_checkpoints_resume_on_one(tmp_path, extracted):
    """Both ranks read disjoint shards of the features; then an FSDP run over both writes its
    shards, metrics.jsonl and samples of the sharded EMA; one process, unsharded, resumes from the shards."""
    out = tmp_path / "run"
    os.makedirs(out)
    mp.spawn(_worker, args=(_free_port(), extracted[0], str(out), extracted[1]), nprocs=2, join=True)
    import imageio.v2 as imageio
    grid = imageio.mimread(out / "phase2" / "samples" / "step0000002.gif")  # 4 captions of 17 frames, 64x128
    assert len(grid) >= 2 and grid[0].shape[:2] == (64, 4 * 128)
    seen = torch.load(out / "seen.pt")
    assert seen["dtypes"] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    zero, one = seen["seen"]
    import video_data
    everything = sorted(x["latent"].sum().item() for x in video_data.FeatureDataset(extracted[0]))
    assert not set(zero) & set(one) and sorted(zero + one) == pytest.approx(everything)
    index = load(out / "phase2" / "ckpt.pt")
    shards = sorted(os.listdir(out / "phase2" / index["sharded"]))
    assert index["step"] == 2 and "model" not in index and shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # buckets of 2, 1 and 3 clips: 3 batches of 4 an epoch, one round of 2 ranks; 2 steps: 2 epochs
    assert index["data"] == [2, 0]
    lines = [json.loads(line) for line in open(out / "phase2" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        for key in ("loss", "loss_k0", "loss_k1", "loss_k2", "grad_norm", "lr", "step_time", "tokens_per_s",
                    "samples_per_s", "peak_memory_gb", "mfu", "tflops_per_step"):
            assert isinstance(r[key], float) and r[key] > 0, key
        assert r["samples_per_s"] == pytest.approx(8 / r["step_time"])  # 2 ranks x 4 clips
        assert r["mfu"] == pytest.approx(r["tflops_per_step"] / r["step_time"] / (2 * 0.001))
    with pytest.raises(SystemExit, match="index of a sharded checkpoint.*python checkpoint.py"):
        sample.load(str(out / "phase2" / "ckpt.pt"))
    model = str(out / "model.pt")
    checkpoint.main([str(out / "phase2" / "ckpt.pt"), f"--out={model}"])
    full = load(model)
    # one process, unsharded: the shards load into it (max_steps 2: nothing trained, a single file written)
    cfg = settings(extracted[0], out, "--max_steps=2", "--resume=true")
    train.train(cfg, quiet=True)
    one = load(out / "phase2" / "ckpt.pt")
    assert "sharded" not in one and one["history"] == index["history"] and one["data"] == [2, 0]
    assert all(torch.equal(one["model"][k], full["model"][k]) and torch.equal(one["ema"][k], full["ema"][k])
               for k in full["model"])
    assert not any(f.endswith(".dcp") for f in os.listdir(out / "phase2"))  # the shards are superseded
    train.train(dataclasses.replace(cfg, max_steps=3), quiet=True)  # and it trains on
    assert len(load(out / "phase2" / "ckpt.pt")["history"]) == 3


def test_samples_every_n_steps_on_the_toy_data(tmp_path):
    train.main(["--preset=tiny-pixel", "--batch_size=6", "--max_steps=2", "--sample_every=1", "--eval_captions=0",
                "--sample_steps=1,1,1", "--sample_steps_later=1,1,1", "--log_every=1", "--device=cpu",
                f"--out_dir={tmp_path}"])
    import imageio.v2 as imageio
    assert sorted(os.listdir(tmp_path / "samples")) == ["step0000001.gif", "step0000002.gif"]
    assert imageio.mimread(tmp_path / "samples" / "step0000002.gif")[0].shape[:2] == (32, 4 * 32)


# ---------------------------------------------------------------- preemption

def test_a_signal_mid_step_drops_the_partial_step_and_the_resumed_run_redoes_it(tmp_path, extracted, monkeypatch):
    import video_data
    scans, load_entries = [], video_data.load_entries
    monkeypatch.setattr(video_data, "load_entries", lambda path: scans.append(path) or load_entries(path))
    cfg = settings(extracted[0], tmp_path / "whole", "--max_steps=3")  # one process: 2 micro-steps a step
    whole = train.train(cfg, quiet=True)[0]
    assert scans == [extracted[0]]  # the annotation file is read once a run (checks and training)
    batch, calls = train.FeatureVideo.batch, []

    def signalled(self, g, device):
        calls.append(1)
        if len(calls) == 3:  # step 2's first micro-step
            os.kill(os.getpid(), signal.SIGTERM)
        return batch(self, g, device)
    monkeypatch.setattr(train.FeatureVideo, "batch", signalled)
    stopped = dataclasses.replace(cfg, out_dir=str(tmp_path / "stopped"))
    with pytest.raises(SystemExit, match="interrupted by SIGTERM after step 1"):
        train.train(stopped, quiet=True)
    monkeypatch.undo()
    assert len(calls) == 3 and load(tmp_path / "stopped" / "phase2" / "ckpt.pt")["step"] == 1
    assert train.train(dataclasses.replace(stopped, resume=True), quiet=True)[0] == pytest.approx(whole, rel=1e-6)


def torchrun(data, out, *argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *TINY, *PHASE, f"--data={data}", f"--out_dir={out}", "--fsdp=true",
           "--global_batch=16", "--workers=1", *argv]  # 4 clips x 2 ranks x 2 micro-steps
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_under_torchrun_keeps_every_step_and_resumes_to_the_same_losses(tmp_path, extracted):
    data, run = extracted[0], tmp_path / "stopped"
    job = torchrun(data, run, "--max_steps=60")
    lines = run / "phase2" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None and \
            (not lines.exists() or len(lines.read_text().splitlines()) < 2):
        time.sleep(0.1)
    done = len(lines.read_text().splitlines())
    job.send_signal(signal.SIGTERM)  # as a scheduler does: torchrun passes it to its workers
    log = job.communicate(timeout=120)[0]
    assert "SIGTERM: stopping after this step" in log and "interrupted by SIGTERM after step" in log, log[-3000:]
    stopped = load(run / "phase2" / "ckpt.pt")
    assert done <= stopped["step"] < 60  # no finished step is lost
    end = stopped["step"] + 2
    assert torchrun(data, run, f"--max_steps={end}", "--resume=true").wait(timeout=180) == 0
    assert torchrun(data, tmp_path / "whole", f"--max_steps={end}").wait(timeout=180) == 0
    resumed, whole = (load(d / "phase2" / "ckpt.pt") for d in (run, tmp_path / "whole"))
    assert len(resumed["history"]) == end and resumed["history"] == pytest.approx(whole["history"], rel=1e-6)
    assert resumed["data"] == whole["data"]


# ---------------------------------------------------------------- FLOPs, the dry run, the GPU check

def test_model_flops_from_the_config():
    # one block of width 4, 3 video + 2 text tokens: qkv, out and MLP 12 D^2 a token, attention 2 x 2 L^2 D
    per_token, L = 12 * 16, 5
    assert metrics.forward_flops(4, 1, 3, 2) == 2 * per_token * L + 4 * L * L * 4 - 2 * 9 * 16 * 2
    assert metrics.train_flops(4, 1, 3, 2) == 3 * metrics.forward_flops(4, 1, 3, 2)
    # the paper's model on phase 3's longest sample, 15,360 video + 128 text tokens (L = 15,488):
    # 3 x 24 x 2 x (12 x 1536^2 x L + 2 x L^2 x 1536) = 1.692e14, of which attention is 63%
    assert metrics.train_flops(1536, 24, 15_360, 128) == pytest.approx(1.692e14, rel=1e-3)
    assert metrics.peak_tflops("cpu") is None and metrics.peak_tflops("cpu", 5.0) == 5.0


def test_the_dry_run_prints_the_flops_of_a_step(capsys):
    train.main(["--preset=full", "--phase=3", "--dry_run=true", "--world=8"])
    out = capsys.readouterr().out
    assert "model FLOPs per step: 1.81e+16 = 384 samples x 4.71e+13" in out


def test_gpu_check_refuses_without_cuda_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run")
    import toy.gpu_check as gpu_check
    args = gpu_check.parse(["--steps=3", "--bf16_tolerance=0.2"])
    assert (args.steps, args.bf16_tolerance, args.fp32_tolerance) == (3, 0.2, gpu_check.parse([]).fp32_tolerance)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "toy", "gpu_check.py")], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0 and "CUDA" in out.stderr
