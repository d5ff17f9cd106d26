"""
Sharded checkpoints of FSDP runs (torch.distributed.checkpoint), and the one command that writes
the single-file checkpoint sample.py reads:

    python checkpoint.py out/full/phase3/ckpt.pt [--out=out/full/phase3/model.pt]

An FSDP run never gathers its 2B model, EMA and AdamW states (about 32 GB in fp32) on one rank:
every rank writes its own shards into out_dir/ckpt.step<N>.dcp/, and rank 0 then writes ckpt.pt,
a small index (step, settings, loss history, data position, what sample.py needs beside the
weights) that names the folder. Written in that order, with the folder renamed into place only
when complete, a crash at any moment leaves an index naming a whole checkpoint. The shards load
on any number of processes, sharded or not (one process included): DCP reshards as it reads.
"""
import os
import shutil
import sys

import torch
import torch.distributed as dist

from common import fail, load_module, load_optimizer, module_state, optimizer_state, read_checkpoint, save_torch


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _states(model, ema, opt):
    """Sharded state dicts by fully qualified names (DTensor shards under FSDP, tensors otherwise)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    states = dict(model=get_model_state_dict(model), ema=get_model_state_dict(ema))
    if opt is not None:
        states["optimizer"] = get_optimizer_state_dict(model, opt)
    return states


def save_sharded(path, model, ema, opt, index):
    """Every rank: its shards of model, EMA and optimizer into the step's folder; then rank 0 writes
    the index `path`. Nobody returns before the checkpoint is complete (a preempted run exits next)."""
    import torch.distributed.checkpoint as dcp
    name = f"ckpt.step{index['step']}.dcp"
    root = os.path.dirname(path)
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    master = not dist.is_initialized() or dist.get_rank() == 0
    if master:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died part-way
    _barrier()
    dcp.save(_states(model, ema, opt), checkpoint_id=tmp)
    _barrier()  # every rank's shards are on disk (and rank 0's .metadata)
    if master:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        save_torch(path, dict(index, sharded=name))
        _remove_shards(root, keep=name)
    _barrier()


def _remove_shards(root, keep=None):
    """Shard folders that the index no longer names."""
    for old in os.listdir(root):
        if old.startswith("ckpt.step") and old.endswith(".dcp") and old != keep:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def shard_folder(path, index):
    """The folder of shards the index `path` (its dict `index`) names; one line if it is missing."""
    folder = os.path.join(os.path.dirname(path), index["sharded"])
    if not os.path.isdir(folder):
        fail(f"{path} names the shards {folder}, which are missing")
    return folder


def load_sharded(path, index, model, ema, opt=None):
    """The shards named by the index `path` (read_checkpoint's dict `index`) into model, EMA and,
    if given, the optimizer, whatever their sharding; every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    folder = shard_folder(path, index)
    states = _states(model, ema, opt)
    try:
        dcp.load(states, checkpoint_id=folder)
    except Exception as e:  # noqa: BLE001 - a foreign or damaged folder gets one line
        fail(f"{folder} does not fit this model ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})")
    set_model_state_dict(model, states["model"])
    set_model_state_dict(ema, states["ema"])
    if opt is not None:
        set_optimizer_state_dict(model, opt, states["optimizer"])


def save(path, model, ema, opt, fsdp, index, alone=False):
    """Every rank: a run's checkpoint, sharded under FSDP, else one file (save_file)."""
    if fsdp:
        return save_sharded(path, model, ema, opt, index)
    save_file(path, model, ema, opt, False, index, alone)


def save_file(path, model, ema, opt, fsdp, index, alone=False, pack=None):
    """Every rank: a run's checkpoint as one file (gathered under FSDP: every rank takes part) from
    rank 0; the others wait for it (a preempted job exits only once the file is whole). alone=True
    (not FSDP): this rank writes it by itself, no collective (a data error that only this rank met).
    pack(weights): what of the weights is stored (a LoRA run: its adapters, lora.adapter_checkpoint)."""
    weights = dict(model=module_state(model, fsdp), ema=module_state(ema, fsdp),
                   optimizer=optimizer_state(model, opt, fsdp))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if alone or rank == 0:
        # a rank's own temporary file
        save_torch(path, dict(index, **(pack(weights) if pack else weights)), rank)
        _remove_shards(os.path.dirname(path))  # a run that was sharded before
    if not alone:
        _barrier()


def load(path, ck, model, ema, opt, fsdp):
    """A checkpoint (read_checkpoint's dict `ck`, sharded or one file) into model, EMA and, if
    given, the optimizer, sharded (fsdp) or not."""
    if ck.get("sharded"):
        return load_sharded(path, ck, model, ema, opt)
    load_module(model, ck.get("model"), fsdp, path)
    load_module(ema, ck.get("ema"), fsdp, path)
    if opt is not None:
        load_optimizer(model, opt, ck.get("optimizer"), fsdp, path)


def consolidate(path, out):
    """One file from a sharded checkpoint: the index with the full model and EMA (fp32, on the CPU,
    as an unsharded run writes them; no optimizer: a run resumes from the shards)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    index = read_checkpoint(path, "pyramid-flow", "checkpoint", sharded=True)
    if not index.get("sharded"):
        fail(f"{path} is a single-file checkpoint already")
    folder = shard_folder(path, index)
    states = {}
    # the saved metadata tells the shapes: no model needed (as torch's dcp_to_torch_save, without AdamW)
    _load_state_dict(states, storage_reader=FileSystemReader(folder), no_dist=True,
                     planner=_EmptyStateDictLoadPlanner(keys={"model", "ema"}))
    full = {k: v for k, v in index.items() if k != "sharded"}
    save_torch(out, dict(full, model=states["model"], ema=states["ema"], optimizer=None))
    return out


def start_from(path, model, ema, task, fsdp):
    """--init_from: the weights and EMA of another run's checkpoint (a previous phase), same network
    (settings that only trade memory or speed, such as grad checkpointing, may differ)."""
    ck = read_checkpoint(path, "pyramid-flow", "checkpoint", " (--init_from)", mmap=True, sharded=True)
    memory_only = ("grad_checkpointing", "manual_attention", "per_frame_attention")
    arch = lambda c: {k: v for k, v in (c or {}).items() if k not in memory_only}  # noqa: E731
    if ck.get("task") != task.cfg.task or arch(ck.get("dit_config")) != arch(task.extra().get("dit_config")):
        fail(f"--init_from={path} is not a {task.cfg.task} checkpoint of this network ({ck.get('dit_config')})")
    load(path, ck, model, ema, None, fsdp)


def same_weights(a, b):
    """Two state dicts (or None) hold the same tensors."""
    if a is None or b is None:
        return a is None and b is None
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def main(argv):
    args = [a for a in argv if not a.startswith("--out=")]
    outs = [a.split("=", 1)[1] for a in argv if a.startswith("--out=")]
    if len(args) != 1 or args[0].startswith("-"):
        raise SystemExit("usage: python checkpoint.py RUN/ckpt.pt [--out=RUN/model.pt]")
    out = outs[0] if outs else os.path.join(os.path.dirname(args[0]), "model.pt")
    consolidate(args[0], out)
    print(f"wrote {out}: the model and its EMA in one file (python sample.py --ckpt={out})")


if __name__ == "__main__":
    main(sys.argv[1:])
