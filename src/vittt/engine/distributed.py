"""One code path for one process or many (torchrun): the process group, reductions, sharded evaluation."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

__all__ = ['DistInfo', 'init_distributed', 'shutdown_distributed', 'all_reduce_sum', 'barrier', 'ShardSampler',
           'eval_loader']


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str] = None) -> DistInfo:
    """Single process, or the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    if device is None:
        device = f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    """Destroy the process group, if one was made: left to the interpreter's exit, gloo's transport threads can
    still be running while static destructors run, and a rank then aborts (``terminate called without an active
    exception``, exit code -6) after its work is done."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: List[float], info: DistInfo) -> List[float]:
    """Element-wise sum of ``values`` over the processes (float64)."""
    if info.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == 'cuda' else 'cpu')
    dist.all_reduce(t)
    return t.tolist()


def all_gather_objects(obj, info: DistInfo) -> List:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects, e.g. per-shard predictions)."""
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


class ShardSampler(Sampler):
    """Every index exactly once across processes (rank::world), for evaluation without padding duplicates."""

    def __init__(self, n: int, info: DistInfo):
        self.indices = list(range(info.rank, n, info.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def eval_loader(dataset, batch_size: int, num_workers: int, info: DistInfo, collate_fn=None) -> DataLoader:
    from .rng import seed_worker
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), info),
                      num_workers=num_workers, worker_init_fn=seed_worker, persistent_workers=False,
                      collate_fn=collate_fn)
