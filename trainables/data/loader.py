"""DataLoaders for one Ray Train worker: which samples it sees, in which order, and how fast.

- Training: a ``DistributedSampler`` seeded with the trial's ``seed`` (Ray's
  ``prepare_data_loader`` adds one with seed 0 whatever the trial, so two seeds would see the same
  order), wrapped so each sample comes with its own augmentation seed drawn from (seed, epoch,
  sample id). A view then depends neither on which loader process makes it nor on how many there
  are, so ``loader.workers`` changes speed, never results, and a resumed run draws what an
  uninterrupted one would. ``drop_last``: BatchNorm is never handed a batch of one.
- Evaluation: each worker takes every ``world``-th sample, without the padding
  ``DistributedSampler`` adds (it repeats samples to even out the shards, which would count them
  twice in a metric summed across workers).
- Speed: decoding and augmentation in ``loader.workers`` processes (by default one per CPU the Ray
  worker holds, less the training process), pinned memory on CUDA so the host-to-device copy is
  asynchronous, persistent training workers (no re-fork per epoch), ``prefetch`` batches ahead.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from trainables.config import LoaderConfig


def default_workers(cfg: LoaderConfig, cpus: float, in_memory: bool, cuda: bool) -> int:
    """Loader processes for a Ray worker holding ``cpus`` CPUs (see ``LoaderConfig.workers``): on
    a GPU one per CPU (the training process mostly waits for the device, as in torchvision's and
    timm's recipes), on the CPU one fewer (the training process computes)."""
    if cfg.workers is not None:
        return cfg.workers
    return 0 if in_memory else max(0, math.floor(cpus) - (0 if cuda else 1))


class SeededSampler(Sampler):
    """Yields ``(position, augmentation seed)``: the inner sampler's order, one seed per (trial
    seed, epoch, sample). Datasets accept such keys (``trainables.data.base.split_key``)."""

    def __init__(self, inner: DistributedSampler, seed: int):
        self.inner, self.seed, self.epoch = inner, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for pos in self.inner:
            # SeedSequence mixes the three integers well (adjacent epochs or samples get unrelated
            # seeds); 63 bits fit torch.manual_seed.
            yield pos, int(np.random.SeedSequence([self.seed % 2**63, self.epoch, pos]).generate_state(2, np.uint64)[0]
                           >> np.uint64(1))

    def __len__(self) -> int:
        return len(self.inner)


class ShardSampler(Sampler):
    """Positions ``rank, rank + world, ...``: every sample on exactly one worker, in order."""

    def __init__(self, n: int, rank: int, world: int):
        self.positions = range(rank, n, world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.positions)

    def __len__(self) -> int:
        return len(self.positions)


def _speed(cfg: LoaderConfig, workers: int, cuda: bool, persistent: bool) -> dict:
    kw: dict = {"num_workers": workers, "pin_memory": cfg.pin_memory and cuda}
    if workers:
        kw.update(prefetch_factor=cfg.prefetch, persistent_workers=persistent)
    return kw


def train_loader(ds: Dataset, batch_size: int, *, seed: int, rank: int, world: int, cfg: LoaderConfig,
                 workers: int, cuda: bool) -> DataLoader:
    """The training loader of one worker: ``batch_size`` per worker, full batches only. Call
    ``loader.sampler.set_epoch(epoch)`` before each epoch."""
    shard = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    if len(shard) < batch_size:
        raise ValueError(f"batch_size: each of the {world} worker(s) gets {len(shard)} training images per epoch, "
                         f"fewer than its batch of {batch_size}; lower batch_size or use fewer workers")
    return DataLoader(ds, batch_size=batch_size, sampler=SeededSampler(shard, seed), drop_last=True,
                      **_speed(cfg, workers, cuda, persistent=True))


def eval_loader(ds: Dataset, batch_size: int, *, rank: int, world: int, cfg: LoaderConfig, workers: int,
                cuda: bool) -> DataLoader:
    """This worker's shard of an evaluation split, in order; loader processes only while it runs
    (an evaluation pass is rarer than an epoch and holds no state worth keeping)."""
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world),
                      **_speed(cfg, workers, cuda, persistent=False))


__all__ = ["SeededSampler", "ShardSampler", "default_workers", "eval_loader", "train_loader"]
