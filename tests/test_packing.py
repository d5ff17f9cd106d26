"""One pass of the network for all stage groups of a training step (dit.Packing, MMDiT.packed).

The packed pass must give each group what its own call gives (outputs, the loss and its gradients,
fp32), and a group must never see another group's tokens (perturb one group: the others' outputs
do not move). Tolerances: fp32 results of the same operations in another order and batching,
a few ulps of values of order 1, summed over 4 blocks: 1e-5 absolute.
"""
import dataclasses

import torch

import dit
import text_to_video
import pyramid_flow as pf
import train

TOL = 1e-5


def model(**kw):
    torch.manual_seed(0)
    cfg = dataclasses.replace(dit.SIZES["toy"], width=64, heads=2, depth=3, in_channels=4, **kw)
    net = text_to_video.TextToVideo(cfg)
    # adaLN-Zero starts as the identity: random modulation makes every path count
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def groups(seed=1):
    """Three groups as a K = 3 step makes them: own batch, text lengths, history and current size."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    words = ["red circle", "a small blue square moving left", "green", "big yellow triangle up", ""]
    return [
        # lowest stage, two history frames, 3 clips
        dict(frames=[r(3, 4, 4, 4), r(3, 4, 4, 4), r(3, 4, 4, 4)], captions=words[:3], t=torch.rand(3, generator=g)),
        # middle stage, one frame (an image), 2 clips; positions on the full grid
        dict(frames=[r(2, 4, 8, 8)], captions=words[3:5], t=torch.rand(2, generator=g), grid=(16, 16)),
        # full stage, history of three sizes, 1 clip
        dict(frames=[r(1, 4, 4, 4), r(1, 4, 8, 8), r(1, 4, 16, 16)], captions=words[1:2], t=torch.rand(1, generator=g)),
    ]


def apart(net, gs):
    return [net(g["frames"], g["captions"], g["t"], grid=g.get("grid")) for g in gs]


def test_packed_pass_equals_one_call_per_group():
    for kw in (dict(), dict(per_frame_attention=True), dict(manual_attention=True), dict(history_time="current")):
        net = model(**kw)
        for a, b in zip(apart(net, groups()), net.packed(groups())):
            assert a.shape == b.shape
            assert (a - b).abs().max() < TOL, kw


def test_full_sequence_groups_pack_too():
    net = model(causal=False)
    g = torch.Generator().manual_seed(3)
    gs = [dict(frames=list(torch.randn(b, 4, 3, s, s, generator=g).unbind(2)), captions=["red"] * b,
               t=torch.rand(b, generator=g), all_frames=True) for b, s in ((2, 4), (1, 8))]
    apart_out = [net(x["frames"], x["captions"], x["t"], all_frames=True) for x in gs]
    for a, b in zip(apart_out, net.packed(gs)):
        assert a.shape == b.shape and (a - b).abs().max() < TOL


def test_a_group_never_sees_another_groups_tokens():
    net = model()
    base = net.packed(groups())
    changed = groups()
    changed[1]["frames"][0] += 5.0   # the middle group's frame
    changed[1]["captions"] = ["purple hexagon", "x y z w"]
    out = net.packed(changed)
    assert (out[0] - base[0]).abs().max() == 0 and (out[2] - base[2]).abs().max() == 0
    assert (out[1] - base[1]).abs().max() > 1e-2  # the change reaches its own group


def test_video_loss_and_gradients_equal_the_per_group_calls():
    windows = pf.stage_windows(3)
    net = model()
    loss_fn = train.VideoLoss(net, windows)
    batch = []
    for k, x in zip((2, 1, 0), groups(seed=5)):
        t = torch.rand(x["t"].shape[0])
        batch.append(dict(history=x["frames"][:-1], x_t=x["frames"][-1], t=t, tau=pf.model_time(k, t, windows),
                          target=torch.randn_like(x["frames"][-1]), stage=k, grid=x.get("grid"),
                          captions=x["captions"]))
    loss, logs = loss_fn(batch)
    loss.backward()
    packed_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    # the reference: one call per group, the loss as a mean over all clips
    total = sum(torch.nn.functional.mse_loss(net(g["history"] + [g["x_t"]], g["captions"], g["tau"], grid=g["grid"]),
                                             g["target"]) * g["x_t"].shape[0] for g in batch)
    ref = total / sum(g["x_t"].shape[0] for g in batch)
    ref.backward()
    assert abs(loss.item() - ref.item()) < TOL
    for p, g in zip(net.parameters(), packed_grads):
        assert (p.grad - g).abs().max() < TOL * max(1.0, p.grad.abs().max().item())
    assert set(logs) == {"loss_k0", "loss_k1", "loss_k2"}


def test_packed_pass_under_gradient_checkpointing():
    outs, grads = [], []
    for ckpt in (False, True):
        net = model(grad_checkpointing=ckpt).train()
        out = net.packed(groups())
        sum(o.square().mean() for o in out).backward()
        outs.append(out)
        grads.append([p.grad for p in net.parameters()])
    assert all((a - b).abs().max() < TOL for a, b in zip(*outs))
    assert all((a - b).abs().max() < TOL for a, b in zip(*grads))
