"""The toy experiments (toy/spatial_pyramid.py, temporal_pyramid.py, renoise.py, causal.py,
efficiency.py) run end to end in --quick mode, on one shared one-step VAE: each prints its table
and writes its PNG, both arms train the same steps, and the numbers that are exact are exact."""
import dataclasses
import os

import pytest

import config
import train
from toy import causal, efficiency, experiment, renoise, spatial_pyramid, temporal_pyramid


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    cfg = dataclasses.replace(config.parse_args(["--preset=vae-toy"]), out_dir=str(out), max_steps=1, batch_size=2)
    train.train(cfg, quiet=True)
    return str(out / "vae.pt")


def quick(tmp_path, vae_ckpt):
    return ["--quick", f"--out_dir={tmp_path}", f"--vae_ckpt={vae_ckpt}"]


def same_budget(curves):
    (a, b) = curves.values()
    assert len(a["losses"]) == len(b["losses"]) == a["steps"][-1] == b["steps"][-1] > 0


def test_spatial_pyramid_against_single_stage(tmp_path, vae_ckpt, capsys):
    curves = spatial_pyramid.main(quick(tmp_path, vae_ckpt))
    same_budget(curves)
    out = capsys.readouterr().out
    assert "FLOPs ratio" in out and "time ratio" in out and "frechet" in out and "chance" in out
    assert out.strip().splitlines()[-1].startswith("verdict: ")
    assert (tmp_path / "spatial_pyramid.png").exists()
    single, pyramid = curves.values()
    assert single["steps"] == [2, 4]  # evaluated along the way (--every=2)
    assert single["flops"][1] == 2 * single["flops"][0] > 0


def test_turns_alternate_chunks_of_steps():
    import threading
    turns, log = experiment.Turns(2), []

    def job(i, n):
        turns.take(i)
        for s in range(1, n + 1):
            log.append((i, s))
            if s % 2 == 0 and s != n:
                turns.pause(i)
        turns.give(i, finished=True)
    threads = [threading.Thread(target=job, args=(i, n)) for i, n in ((0, 6), (1, 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log == [(0, 1), (0, 2), (1, 1), (1, 2), (0, 3), (0, 4), (1, 3), (1, 4), (0, 5), (0, 6)]


def test_equal_tokens_grows_the_pyramids_batch_to_the_baselines_tokens():
    cfg, _, _ = experiment.parse([], spatial_pyramid.OWN, spatial_pyramid.SETTINGS, {})
    single, pyramid = spatial_pyramid.arms(cfg, equal_tokens=True).values()
    # text tokens counted: 24 x (64 + 5) = 1656; 17 x ((64 + 5) + (16 + 5) + (4 + 5)) = 1683
    assert single.batch_size == 24 and pyramid.batch_size == 51
    assert experiment.tokens_per_clip(single) == 64 and experiment.tokens_per_clip(pyramid) == 28
    assert [a.batch_size for a in spatial_pyramid.arms(cfg, equal_tokens=False).values()] == [24, 24]
    # the blocks' FLOPs a step: about equal at equal tokens (attention is quadratic: the pyramid's less)
    ratio = experiment.train_flops(pyramid) / experiment.train_flops(single)
    assert 0.85 < ratio < 1.0


def test_temporal_pyramid_against_full_sequence(tmp_path, vae_ckpt, capsys):
    curves, tokens = temporal_pyramid.main(quick(tmp_path, vae_ckpt))
    same_budget(curves)
    assert tokens["full sequence"] == 3 * 16  # 5 frames -> 3 latent frames of 8 x 8, patch 2
    assert tokens["temporal pyramid (K = 2)"] < tokens["full sequence"]
    out = capsys.readouterr().out
    assert "equal steps" in out and "equal wall time" in out and "consistency" in out
    assert out.strip().splitlines()[-1].startswith("verdict: ")
    assert (tmp_path / "temporal_pyramid.png").exists()


def test_renoise_four_ways_on_textured_and_plain_shapes(tmp_path, capsys):
    results = renoise.main(["--quick", f"--out_dir={tmp_path}"])  # pixel space: no VAE
    assert list(results) == ["textured", "plain (control)"]
    for rows in results.values():
        assert list(rows) == ["real images", *renoise.WAYS]
        # no corrective noise at the last jump: the last stage starts from flat 2 x 2 blocks, and an
        # (almost) untrained model moves them little
        assert rows["neither"][0] < rows["both jumps"][0]
    assert results["textured"]["real images"][0] > 0.3  # real texture lives inside 2 px blocks
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("verdict: ")
    assert (tmp_path / "renoise.png").exists()


def test_object_shares_are_zero_on_flat_blocks_and_high_on_texture():
    from toy import data
    flat = data.shapes_batch(4, frames=1, size=32, generator=0)[0]
    coarse = renoise.pf.up(renoise.pf.down(flat[:, :, 0], 1), 1)[:, :, None]   # flat 2 x 2 blocks
    assert renoise.object_shares(coarse, 1.0)[0] == pytest.approx(0.0, abs=1e-9)
    textured = data.shapes_batch(4, frames=1, size=32, generator=0, keep=0.5)[0]
    assert renoise.object_shares(textured, 0.5)[0] > 0.5


def test_causal_against_bidirectional(tmp_path, vae_ckpt, capsys):
    curves = causal.main(quick(tmp_path, vae_ckpt))
    same_budget(curves)
    out = capsys.readouterr().out
    assert "blockwise-causal" in out and "bidirectional" in out and "identity_change" in out
    assert out.strip().splitlines()[-1].startswith("verdict: ")
    assert all(c["sample_seconds"] > 0 for c in curves.values())
    assert (tmp_path / "causal.png").exists()


def test_efficiency_token_table_and_the_two_ratio_lines(tmp_path, capsys):
    efficiency.main(["--quick", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    paper = next(line for line in out.splitlines() if line.startswith("paper, 10 s 768p"))
    assert paper.split()[-4:-1] == ["31", "119040", "15360"]
    phase3 = next(line for line in out.splitlines() if line.startswith("preset full phase 3"))
    assert phase3.split()[-5:] == paper.split()[-5:]  # the full recipe's 10 s 768p clips are the paper's
    assert "10,320" in out  # the paper's TN/4^K, one level off
    *_, a, b, c = out.strip().splitlines()
    prefixes = ("sampling time ratio, spatial pyramid / single stage: ",
                "training step time ratio, temporal pyramid / full sequence: ",
                "training step time ratio, spatial pyramid / single stage at equal images: ")
    for line, prefix in zip((a, b, c), prefixes):
        assert line.startswith(prefix) and float(line[len(prefix):]) > 0


def test_first_reaching_and_value_at():
    curve = dict(steps=[10, 20, 30], seconds=[1.0, 2.0, 3.0], scores=[dict(q=0.2), dict(q=0.5), dict(q=0.4)])
    assert experiment.first_reaching(curve, "q", 0.4) == 20
    assert experiment.first_reaching(curve, "q", 0.4, axis="seconds") == 2.0
    assert experiment.first_reaching(curve, "q", 0.3, higher_is_better=False) == 10
    assert experiment.first_reaching(curve, "q", 0.9) is None
    assert experiment.value_at(curve, "q", 2.5, "seconds") == 0.5 and experiment.value_at(curve, "q", 5) is None


def test_options_go_to_the_script_and_settings_to_train(tmp_path):
    cfg, opts, quick = experiment.parse(["--every=7", "--lr=0.5", "--quick", "--max_steps=9"],
                                        dict(every=100, seeds="1"), dict(max_steps=50), dict(max_steps=4))
    assert opts == dict(every=7, seeds="1") and quick and cfg.lr == 0.5 and cfg.max_steps == 9
    assert cfg.width == experiment.QUICK["width"] and cfg.preset == "tiny"
    with pytest.raises(SystemExit, match="unknown setting --nope"):
        experiment.parse(["--nope=1"], {}, {}, {})
    assert os.path.basename(experiment.EXPERIMENTS_DIR) == "experiments"
