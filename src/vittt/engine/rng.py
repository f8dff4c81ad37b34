"""Seeding that makes a run a function of (seed, update, sample) only, so a run resumed anywhere equals the
uninterrupted one, whatever the number of data-loading workers.

* Before each update the main process seeds Python, NumPy and torch from (seed, update, rank): Mixup draws,
  drop-path masks and diffusion noise depend only on the update's index.
* :class:`SeededDataset` seeds them from (seed, epoch, index) before loading each training sample, so an image's
  augmentation depends only on which epoch and index it is, not on the worker or on what was loaded before.
* The sampler's order depends on (seed, epoch) (``DistributedSampler``); resuming mid-epoch skips the batches done.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ['derive_seed', 'seed_all', 'seed_worker', 'rng_state', 'set_rng_state', 'SeededDataset']

_MASK = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix64 over the parts): nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & _MASK


def seed_all(seed: int, accelerators: bool = True) -> None:
    """Seed Python, NumPy and torch; ``accelerators=False`` seeds torch's CPU generator only (0.4 ms less: what
    data loading needs)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    if accelerators:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2 ** 32  # set by the DataLoader from its generator: per epoch and worker
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]])


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    kind, keys, *rest = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


class SeededDataset(Dataset):
    """``dataset[i]`` with every RNG seeded from (seed, epoch, i) first; :meth:`set_epoch` before each epoch."""

    _SALT = 0x5EED

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        seed_all(derive_seed(self._SALT, self.seed, self.epoch, index), accelerators=False)
        return self.dataset[index]
