"""Classification training and evaluation: one code path for one process or many (torchrun, DDP).

Reproducibility and resumption: every epoch starts by seeding Python, NumPy and torch from (seed, epoch, rank) and
the sampler from (seed, epoch), so an epoch's data order, augmentation, Mixup and drop-path draws depend only on the
weights at its start. Checkpoints are written atomically at the end of every epoch with the model, EMA, optimizer,
AMP scaler, epoch, update count (the scheduler is a function of it), metrics history and RNG states; ``resume``
restarts an interrupted run at the start of the epoch it was in, which reproduces the uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..data import first_n
from ..io import atomic_write
from ..models.official import CheckpointError
from .recipe import scaled_lr

__all__ = ['DistInfo', 'init_distributed', 'build_model', 'Trainer', 'evaluate', 'load_training_checkpoint',
           'CHECKPOINT_FORMAT']

CHECKPOINT_FORMAT = 'vittt-train-1'


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


def _all_reduce(values: List[float], info: DistInfo) -> List[float]:
    if info.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2 ** 32  # set by the DataLoader from its generator: per epoch and worker
    random.seed(seed)
    np.random.seed(seed)


def build_model(recipe: Dict[str, Any], num_classes: int) -> torch.nn.Module:
    """``timm.create_model`` with the recipe's regularisation; any registered model (ours or timm's)."""
    import timm

    kwargs = dict(num_classes=num_classes, drop_path_rate=recipe['drop_path'], drop_rate=recipe['drop'],
                  in_chans=recipe['in_chans'])
    kwargs.update(recipe.get('model_kwargs') or {})  # explicit model arguments win
    try:
        model = timm.create_model(recipe['model'], img_size=recipe['img_size'], **kwargs)
    except TypeError as e:  # models without an img_size argument (convnets)
        if 'img_size' not in str(e):
            raise
        model = timm.create_model(recipe['model'], **kwargs)
    if recipe.get('grad_checkpointing'):
        model.set_grad_checkpointing(True)
    return model


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]])


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state['python']))
    kind, keys, *rest = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def load_training_checkpoint(path) -> Dict[str, Any]:
    """Read a checkpoint written by :class:`Trainer` (``weights_only``), or raise CheckpointError saying why."""
    from ..models.official import load_checkpoint_file

    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or ckpt.get('format') != CHECKPOINT_FORMAT:
        raise CheckpointError(f'{path}: not a vittt training checkpoint (no format {CHECKPOINT_FORMAT!r}); '
                              f'for model weights use vittt eval --checkpoint')
    return ckpt


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, info: DistInfo, amp_dtype=None) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy over the loader (summed across processes)."""
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]  # loss sum, top1 hits, top5 hits, count
    autocast = torch.autocast(info.device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    for images, targets in loader:
        images, targets = images.to(info.device), targets.to(info.device)
        with autocast:
            logits = model(images)
        logits = logits.float()
        totals[0] += F.cross_entropy(logits, targets, reduction='sum').item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        totals[1] += hits[:, 0].sum().item()
        totals[2] += hits.any(dim=1).sum().item()
        totals[3] += len(targets)
    loss, top1, top5, count = _all_reduce(totals, info)
    if count == 0:
        raise ValueError('the evaluation set is empty')
    return dict(loss=loss / count, top1=100 * top1 / count, top5=100 * top5 / count, count=int(count))


class _Shard(torch.utils.data.Sampler):
    """Every index exactly once across processes (rank::world), for evaluation without padding duplicates."""

    def __init__(self, n: int, info: DistInfo):
        self.indices = list(range(info.rank, n, info.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def eval_loader(dataset, batch_size: int, num_workers: int, info: DistInfo) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=_Shard(len(dataset), info), num_workers=num_workers,
                      worker_init_fn=_seed_worker, persistent_workers=False)


class Trainer:
    """Fits ``recipe['model']`` on ``train_set``, evaluating on ``val_set`` every ``eval_every`` epochs.

    Writes to ``output``: ``last.pth`` (every epoch, atomically), ``best.pth`` (best top-1), ``recipe.yaml``,
    ``metrics.jsonl`` and ``metrics.csv`` (one row per epoch), ``curves.png`` (at the end), and TensorBoard events when the
    ``tensorboard`` package is installed. Only rank 0 writes.
    """

    def __init__(self, recipe: Dict[str, Any], train_set, val_set, num_classes: int, output, info: DistInfo,
                 resume: Optional[str] = None, progress: bool = True):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler
        from timm.utils import ModelEmaV3

        self.recipe, self.info, self.output = recipe, info, Path(output)
        self.num_classes, self.progress = num_classes, progress and info.is_main
        train_set = first_n(train_set, recipe['train_subset'])
        val_set = first_n(val_set, recipe['val_subset']) if val_set is not None else None
        self.train_set, self.val_set = train_set, val_set
        if len(train_set) < recipe['batch_size'] * info.world_size:
            raise ValueError(f'the training set has {len(train_set)} images, fewer than one global batch '
                             f'({recipe["batch_size"]} × {info.world_size} processes)')
        self.sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=recipe['seed'], drop_last=True)
        self.loader = DataLoader(train_set, batch_size=recipe['batch_size'], sampler=self.sampler, drop_last=True,
                                 num_workers=recipe['num_workers'], worker_init_fn=_seed_worker,
                                 persistent_workers=False)
        self.val_loader = (eval_loader(val_set, recipe['batch_size'], recipe['num_workers'], info)
                           if val_set is not None else None)
        self.iters_per_epoch = len(self.loader)

        seed_all(recipe['seed'])
        self.model = build_model(recipe, num_classes).to(info.device)
        self.ddp = DistributedDataParallel(self.model) if info.world_size > 1 else self.model
        lrs = scaled_lr(recipe, info.world_size)
        self.optimizer = create_optimizer_v2(self.model, recipe['opt'], lr=lrs['lr'],
                                             weight_decay=recipe['weight_decay'], betas=tuple(recipe['opt_betas']),
                                             eps=recipe['opt_eps'])
        total = recipe['epochs'] * self.iters_per_epoch
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=total, lr_min=lrs['min_lr'],
                                           warmup_lr_init=lrs['warmup_lr'],
                                           warmup_t=recipe['warmup_epochs'] * self.iters_per_epoch,
                                           t_in_epochs=False)
        self.amp_dtype = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}[recipe['amp']]
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=recipe['amp'] == 'fp16')
        mixing = recipe['mixup'] > 0 or recipe['cutmix'] > 0
        self.mixup = Mixup(mixup_alpha=recipe['mixup'], cutmix_alpha=recipe['cutmix'], prob=recipe['mixup_prob'],
                           switch_prob=recipe['mixup_switch_prob'], mode=recipe['mixup_mode'],
                           label_smoothing=recipe['label_smoothing'], num_classes=num_classes) if mixing else None
        if mixing:
            self.criterion = SoftTargetCrossEntropy()
        elif recipe['label_smoothing'] > 0:
            self.criterion = LabelSmoothingCrossEntropy(recipe['label_smoothing'])
        else:
            self.criterion = torch.nn.CrossEntropyLoss()
        self.ema = None
        if recipe['model_ema'] or recipe['mesa'] > 0:
            decay = recipe['model_ema_decay'] ** (recipe['batch_size'] * info.world_size / recipe['model_ema_ref_batch'])
            self.ema = ModelEmaV3(self.model, decay=decay)
        self.epoch, self.num_updates, self.history, self.best_top1 = 0, 0, [], -1.0
        if resume:
            self._resume(resume)
        self.scheduler.step_update(self.num_updates)
        self._tb = None

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> Dict[str, Any]:
        return dict(format=CHECKPOINT_FORMAT, model_name=self.recipe['model'], num_classes=self.num_classes,
                    recipe=self.recipe, epoch=self.epoch, num_updates=self.num_updates,
                    model=self.model.state_dict(), ema=self.ema.module.state_dict() if self.ema else None,
                    optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), history=self.history,
                    best_top1=self.best_top1, rng=_rng_state(), world_size=self.info.world_size)

    def save(self, name: str) -> Path:
        state = self._state()
        return atomic_write(self.output / name, lambda tmp: torch.save(state, tmp))

    def _resume(self, path) -> None:
        ckpt = load_training_checkpoint(path)
        for key, mine in (('model_name', self.recipe['model']), ('num_classes', self.num_classes)):
            if ckpt.get(key) != mine:
                raise CheckpointError(f'{path}: the checkpoint is for {key}={ckpt.get(key)!r}, this run has {mine!r}')
        for key in ('batch_size', 'epochs', 'seed', 'img_size'):
            if ckpt['recipe'].get(key) != self.recipe[key]:
                raise CheckpointError(f'{path}: recipe {key} was {ckpt["recipe"].get(key)!r}, now {self.recipe[key]!r}; '
                                      f'resuming needs the same recipe (start a new run instead)')
        try:
            self.model.load_state_dict(ckpt['model'])
            self.optimizer.load_state_dict(ckpt['optimizer'])
            self.scaler.load_state_dict(ckpt['scaler'])
            if self.ema is not None:
                if ckpt['ema'] is None:
                    raise CheckpointError(f'{path}: the run uses EMA but the checkpoint has none')
                self.ema.module.load_state_dict(ckpt['ema'])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f'{path}: does not fit this run: {e}') from e
        self.epoch, self.num_updates = ckpt['epoch'], ckpt['num_updates']
        self.history, self.best_top1 = list(ckpt['history']), ckpt['best_top1']
        _set_rng_state(ckpt['rng'])

    # ------------------------------------------------------------------ logging
    def _log(self, row: Dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        self.history.append(row)
        with open(self.output / 'metrics.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        keys = list(dict.fromkeys(k for r in self.history for k in r))
        lines = [','.join(keys)] + [','.join(str(r.get(k, '')) for k in keys) for r in self.history]
        atomic_write(self.output / 'metrics.csv', lambda tmp: Path(tmp).write_text('\n'.join(lines) + '\n'))
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.output / 'tb'))
            except ImportError:
                self._tb = False
        if self._tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != 'epoch':
                    self._tb.add_scalar(k, v, row['epoch'])

    # ------------------------------------------------------------------ training
    def _teacher_loss(self, logits, images):
        with torch.no_grad():
            teacher = self.ema.module(images).float().softmax(dim=-1)
        return torch.sum(-teacher * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def train_epoch(self) -> Dict[str, float]:
        recipe, info = self.recipe, self.info
        seed_all(recipe['seed'] + 1000 * self.epoch + info.rank)
        self.sampler.set_epoch(self.epoch)
        self.ddp.train()
        use_mesa = self.ema is not None and recipe['mesa'] > 0 and self.epoch >= recipe['mesa_start'] * recipe['epochs']
        autocast = torch.autocast(info.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        loss_sum, seen, start = 0.0, 0, time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.iters_per_epoch, desc=f'epoch {self.epoch + 1}/{recipe["epochs"]}', unit='it',
                       leave=False, file=sys.stderr, dynamic_ncols=True)
        for step, (images, targets) in enumerate(self.loader):
            images, targets = images.to(info.device), targets.to(info.device)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            with autocast:
                logits = self.ddp(images)
                loss = self.criterion(logits.float(), targets)
                if use_mesa:
                    loss = loss + recipe['mesa'] * self._teacher_loss(logits, images)
            if not torch.isfinite(loss):
                raise RuntimeError(f'the loss is {loss.item()} at epoch {self.epoch + 1}, step {step + 1} '
                                   f'(lr {self.optimizer.param_groups[0]["lr"]:.3g}); lower the lr or use amp=bf16/none')
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if recipe['clip_grad']:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe['clip_grad'])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.num_updates += 1
            self.scheduler.step_update(self.num_updates)
            if self.ema is not None:
                self.ema.update(self.model, step=self.num_updates)
            loss_sum += loss.item() * len(images)
            seen += len(images)
            if bar is not None:
                rate = seen * info.world_size / (time.perf_counter() - start)
                bar.set_postfix(loss=f'{loss_sum / seen:.4f}', lr=f'{self.optimizer.param_groups[0]["lr"]:.2e}',
                                img_s=f'{rate:.0f}')
                bar.update()
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        loss_total, count = _all_reduce([loss_sum, float(seen)], info)
        return dict(train_loss=loss_total / count, lr=self.optimizer.param_groups[0]['lr'],
                    epoch_time_s=elapsed, train_img_s=count / elapsed)

    def fit(self) -> List[Dict[str, Any]]:
        if self.info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            import yaml
            atomic_write(self.output / 'recipe.yaml',
                         lambda tmp: Path(tmp).write_text(yaml.safe_dump(self.recipe, sort_keys=False)))
        while self.epoch < self.recipe['epochs']:
            row = dict(epoch=self.epoch + 1, **self.train_epoch())
            last = self.epoch + 1 == self.recipe['epochs']
            if self.val_loader is not None and ((self.epoch + 1) % self.recipe['eval_every'] == 0 or last):
                metrics = evaluate(self.model, self.val_loader, self.info, self.amp_dtype)
                row.update(val_loss=metrics['loss'], top1=metrics['top1'], top5=metrics['top5'])
                if self.ema is not None:
                    ema = evaluate(self.ema.module, self.val_loader, self.info, self.amp_dtype)
                    row.update(ema_top1=ema['top1'], ema_top5=ema['top5'], ema_val_loss=ema['loss'])
            self.epoch += 1
            self._log(row)
            if self.info.is_main:
                improved = row.get('top1', -1.0) > self.best_top1
                if improved:
                    self.best_top1 = row['top1']
                self.save('last.pth')
                if improved:
                    self.save('best.pth')
                print(json.dumps({k: (float(f'{v:.5g}') if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
            if self.info.world_size > 1:
                dist.barrier()
        if self._tb:
            self._tb.close()
        if self.info.is_main and self.history:
            try:
                from .plots import plot_curves
                plot_curves(self.history, self.output / 'curves.png', title=self.recipe['model'])
            except ImportError:  # matplotlib is optional: metrics.csv / .jsonl hold the same numbers
                print('matplotlib is not installed: no curves.png', file=sys.stderr)
        return self.history
