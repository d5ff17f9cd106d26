"""The exact-velocity diagnostic (toy/oracle.py): a perfect network must give perfect samples, so
Algorithm 1, renoising and the scorer are checked together on the real toy data."""
import torch

import pyramid_flow as pf
from toy import evaluate, oracle


def test_caption_images_are_all_the_positions_of_one_caption():
    images = oracle.caption_images("a blue triangle moving up")
    assert images.shape == (400, 3, 32, 32)
    preds = evaluate.classify_shapes(images[:50, :, None].repeat(1, 1, 2, 1, 1).float())
    assert all(p["colour"] == "blue" and p["shape"] == "triangle" for p in preds)


def test_the_exact_velocity_samples_perfect_images():
    captions = ["a red circle moving left", "a green square moving up", "a yellow triangle moving down"]
    sets = [oracle.caption_images(c, draws=4000) for c in captions]
    for K in (1, 3):
        scores, x = oracle.score_images(oracle.oracle_velocity(sets, pf.stage_windows(K)), captions, K, steps=4)
        assert scores["colour"] == 1.0 and scores["shape"] == 1.0
        # and each sample is (almost) one of the data images, not a blend of them
        nearest = torch.stack([(X.float() - xi).flatten(1).abs().max(1).values.min() for X, xi in zip(sets, x)])
        assert (nearest < 0.1).all(), nearest
