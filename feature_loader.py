"""
Batches of extracted features (video_data.FeatureDataset) for many processes: a seeded permutation
per epoch, bucketed by latent length (a batch stacks clips of one length, no padding), of which
each rank reads a disjoint shard, through a torch DataLoader whose workers read and collate the
next batches while the GPU trains on this one.

    epoch e: every bucket shuffled (seed, e) and cut into batches; the batches of all buckets
             shuffled (seed, e) into one list, the same on every rank
    rank r of W reads batches pos + r for pos = 0, W, 2W, ... (one per micro-step)

The position (epoch, pos) counts batches of that global list, so a checkpoint that records it lets
a resumed run read the same sequence, also on another number of processes (batches pos + r of the
new W). Every clip is read at least once an epoch: a bucket's last batch is completed from the
bucket's start. Tensor legend: latents [B, C, T, h, w].
"""
import signal

import torch

from common import SEED_STRIDE, fail


def epoch_batches(buckets, batch_size, seed, epoch):
    """The epoch's global list of batches (lists of dataset indices), each from one bucket."""
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + epoch)
    batches = []
    for T in sorted(buckets):
        ids = buckets[T]
        order = [ids[j] for j in torch.randperm(len(ids), generator=g).tolist()]
        order += order[:(-len(order)) % batch_size]  # the last batch completed from the start
        while len(order) < batch_size:  # a bucket smaller than a batch
            order += order[:batch_size - len(order)]
        batches += [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


def batches_per_epoch(buckets, batch_size):
    return sum(-(-len(ids) // batch_size) for ids in buckets.values() if ids)


def advance(position, per_epoch, world):
    """The position after one micro-step of every rank; an epoch ends when a whole round of `world`
    batches no longer fits (its last few batches are skipped this epoch)."""
    epoch, pos = position
    pos += world
    return (epoch + 1, 0) if pos + world > per_epoch else (epoch, pos)


class ShardedBatches:
    """The batch sampler of one rank: its batches of epoch after epoch, from `position` on."""

    def __init__(self, buckets, batch_size, seed, rank=0, world=1, position=(0, 0)):
        self.buckets, self.batch_size, self.seed = buckets, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = batches_per_epoch(buckets, batch_size)
        if self.per_epoch < world:
            fail(f"{self.per_epoch} batches of {batch_size} clips an epoch cannot feed {world} processes; "
                 f"use a smaller --batch_size or more data")
        epoch, pos = position  # a round of `world` batches that no longer fits: the next epoch
        self.position = (epoch + 1, 0) if pos + world > self.per_epoch else (epoch, pos)

    def __iter__(self):
        epoch, pos = self.position
        while True:
            batches = epoch_batches(self.buckets, self.batch_size, self.seed, epoch)
            while pos + self.world <= self.per_epoch:
                yield batches[pos + self.rank]
                pos += self.world
            epoch, pos = epoch + 1, 0


def _quiet_worker(worker_id):
    """Loader workers ignore SIGINT and SIGTERM: torchrun signals the whole process group, and the
    trainer, not its workers, decides when to stop (after a checkpoint); they end with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(dataset, sampler, workers, pin_memory=False, prefetch=2):
    """A DataLoader over the dataset's collated batches (FeatureDataset.collate); workers > 0 read
    `prefetch` batches each ahead of the loop."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=type(dataset).collate,
                                       num_workers=workers, prefetch_factor=prefetch if workers else None,
                                       pin_memory=pin_memory, worker_init_fn=_quiet_worker if workers else None)


class FeatureStream:
    """The batches one rank trains on, and where it is: position() is the global position after
    the batches taken so far (what a checkpoint records)."""

    def __init__(self, dataset, buckets, batch_size, seed, rank, world, position=(0, 0), workers=0, pin_memory=False):
        self.sampler = ShardedBatches(buckets, batch_size, seed, rank, world, position)
        self.world, self._position = world, self.sampler.position
        self.batches = iter(loader(dataset, self.sampler, workers, pin_memory))

    def next(self):
        batch = next(self.batches)
        self._position = advance(self._position, self.sampler.per_epoch, self.world)
        return batch

    def position(self):
        return list(self._position)
