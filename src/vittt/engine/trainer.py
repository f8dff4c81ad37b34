"""The one training loop: a :class:`~vittt.engine.Task` says what a step and an evaluation are, the engine does
the rest.

**Run length.** Epoch-based (``epochs``: a log row per epoch, evaluation every ``eval_every`` epochs) or step-based
(``steps`` optimizer updates: a log row and an evaluation every ``eval_every`` updates, 0 = at the end only). The lr
schedule (timm, warm-up then cosine or constant) is stepped after every update in both.

**Exact resume.** Before each update every RNG is seeded from (seed, update, rank); each training sample is loaded
with every RNG seeded from (seed, epoch, index) (:class:`~vittt.engine.rng.SeededDataset`); the sampler's order
depends on (seed, epoch). A run is therefore a function of its recipe and its weights at any update. Checkpoints
(``last.pth``: at every log row and every ``checkpoint_every`` updates; ``best.pth``: when the task's best metric
improves) are written atomically with the model, EMA, optimizer, AMP scaler, update count (the schedule is a function
of it), history, the partial sums of the current log row and every RNG state. ``resume`` continues at the update the
checkpoint was written after and reproduces the uninterrupted run bit for bit (CPU).

**Outputs** (rank 0 only): ``recipe.yaml``, ``metrics.jsonl`` / ``metrics.csv``, TensorBoard events when installed,
the checkpoints, and the task's report (``curves.png`` by default).
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..data import first_n
from ..io import atomic_write
from .checkpoint import CheckpointError, load_training_checkpoint, save_checkpoint
from .distributed import DistInfo, all_reduce_sum, barrier, eval_loader
from .logging import MetricsLog, progress_bar
from .recipe import recipe_yaml, scaled_lr
from .rng import SeededDataset, derive_seed, rng_state, seed_all, seed_worker, set_rng_state
from .task import StepContext, Task

__all__ = ['Trainer', 'move_to']

_RESUME_KEYS = ('batch_size', 'epochs', 'steps', 'seed')
_AMP_DTYPES = {'none': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def move_to(batch: Any, device: torch.device) -> Any:
    """Every tensor in a (nested) tuple / list / dict batch moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def _batch_len(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return len(first) if hasattr(first, '__len__') else 1


def _optimizer(model, recipe: Dict[str, Any], lr: float):
    from timm.optim import create_optimizer_v2

    kwargs = {}
    if any(name in recipe['opt'].lower() for name in ('adam', 'lamb')):
        kwargs = dict(betas=tuple(recipe['opt_betas']), eps=recipe['opt_eps'])
    exempt = recipe.get('weight_decay_exempt')
    if exempt:  # the official dense recipes: no decay exactly for the names holding one of these strings
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if any(s in name for s in exempt) else decay).append(param)
        groups = [dict(params=decay, weight_decay=recipe['weight_decay']), dict(params=no_decay, weight_decay=0.0)]
        return create_optimizer_v2(groups, recipe['opt'], lr=lr, weight_decay=recipe['weight_decay'], **kwargs)
    return create_optimizer_v2(model, recipe['opt'], lr=lr, weight_decay=recipe['weight_decay'], **kwargs)


def _scheduler(optimizer, recipe: Dict[str, Any], total: int, warmup: int, lrs: Dict[str, float],
               updates_per_epoch: int):
    from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler

    common = dict(warmup_lr_init=lrs['warmup_lr'], warmup_t=warmup, t_in_epochs=False)
    if recipe['sched'] == 'constant':
        return StepLRScheduler(optimizer, decay_t=total + 1, decay_rate=1.0, **common)
    if recipe['sched'] == 'step':  # milestones in the run's unit (epochs or steps), multiplied by decay_rate
        unit = 1 if recipe.get('steps') is not None else updates_per_epoch
        # timm applies milestone m from step m - 1: +1 so the update that starts epoch m is the first decayed (mmdet)
        milestones = [int(m * unit) + 1 for m in recipe['decay_milestones']]
        return MultiStepLRScheduler(optimizer, decay_t=milestones, decay_rate=recipe['decay_rate'], warmup_prefix=False,
                                    **common)
    if recipe['sched'] == 'poly':
        return PolyLRScheduler(optimizer, t_initial=total, power=recipe['poly_power'], lr_min=lrs['min_lr'],
                               **common)
    return CosineLRScheduler(optimizer, t_initial=total, lr_min=lrs['min_lr'], **common)


def _set_grad_checkpointing(model) -> None:
    """Switch on gradient checkpointing in ``model`` or, for wrappers without the switch (torchvision detectors),
    in the outermost sub-modules that have it."""
    if hasattr(model, 'set_grad_checkpointing'):
        model.set_grad_checkpointing(True)
        return
    done = []
    for name, module in model.named_modules():
        if hasattr(module, 'set_grad_checkpointing') and not any(name.startswith(d + '.') for d in done):
            module.set_grad_checkpointing(True)
            done.append(name)
    if not done:
        raise ValueError(f'grad_checkpointing: {type(model).__name__} has no module that supports it')


class Trainer:
    """Fits ``task.build_model()`` on ``train_set`` with ``task.recipe``, evaluating on ``val_set``; see the module
    docstring. ``output`` is the run folder; ``resume`` a ``last.pth`` (or any checkpoint) of the same run."""

    def __init__(self, task: Task, train_set, val_set, output, info: Optional[DistInfo] = None,
                 resume: Optional[str] = None, progress: bool = True):
        recipe = task.recipe
        self.task, self.recipe, self.info = task, recipe, info or DistInfo()
        self.output, self.progress = Path(output), progress and self.info.is_main
        info = self.info
        train_set = first_n(train_set, recipe['train_subset'])
        self.train_set = train_set
        self.val_set = first_n(val_set, recipe['val_subset']) if val_set is not None else None
        batch = recipe['batch_size']
        if len(train_set) < batch * info.world_size:
            raise ValueError(f'the training set has {len(train_set)} samples, fewer than one global batch '
                             f'({batch} × {info.world_size} processes)')
        self.seeded_set = SeededDataset(train_set, recipe['seed'])
        self.sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                          seed=recipe['seed'], drop_last=True)
        self.iters_per_epoch = len(self.sampler) // batch
        self.step_based = recipe.get('steps') is not None
        self.total_updates = recipe['steps'] if self.step_based else recipe['epochs'] * self.iters_per_epoch
        if self.step_based or recipe.get('warmup_steps') is not None:  # an epoch run may warm up by updates
            warmup = recipe.get('warmup_steps') or 0
        else:
            warmup = int(round(recipe['warmup_epochs'] * self.iters_per_epoch))
        self.val_loader = (eval_loader(self.val_set, batch, recipe['num_workers'], info, task.collate_fn())
                           if self.val_set is not None else None)

        seed_all(recipe['seed'])
        self.model = task.build_model().to(info.device)
        if recipe.get('grad_checkpointing'):
            _set_grad_checkpointing(self.model)
        self.ddp = DistributedDataParallel(self.model) if info.world_size > 1 else self.model
        lrs = scaled_lr(recipe, info.world_size)
        self.optimizer = _optimizer(self.model, recipe, lrs['lr'])
        self.scheduler = _scheduler(self.optimizer, recipe, self.total_updates, warmup, lrs, self.iters_per_epoch)
        self.amp_dtype = _AMP_DTYPES[recipe['amp']]
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=recipe['amp'] == 'fp16')
        self.ema = None
        if recipe['model_ema'] or task.uses_ema():
            from timm.utils import ModelEmaV3
            decay = recipe['model_ema_decay'] ** (batch * info.world_size / recipe['model_ema_ref_batch'])
            self.ema = ModelEmaV3(self.model, decay=decay)
        self.num_updates, self.best = 0, None
        self.log = MetricsLog(self.output, info.is_main)
        self._window = self._empty_window()
        self._window_started = time.perf_counter()  # wall time is not resumed: times are excluded from exactness
        if resume:
            self._resume(resume)
        self.scheduler.step_update(self.num_updates)

    @property
    def epoch(self) -> int:
        """Epochs completed (the epoch the next update belongs to)."""
        return self.num_updates // self.iters_per_epoch

    @property
    def history(self) -> List[Dict[str, Any]]:
        return self.log.history

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _empty_window() -> Dict[str, Any]:
        return dict(steps=0, samples=0, sums={})

    def _state(self) -> Dict[str, Any]:
        return dict(identity=self.task.identity(), task=self.task.name, recipe=dict(self.recipe),
                    epoch=self.epoch, num_updates=self.num_updates,
                    model=self.model.state_dict(), ema=self.ema.module.state_dict() if self.ema else None,
                    optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), history=self.history,
                    best=self.best, window=self._window, rng=rng_state(), world_size=self.info.world_size)

    def save(self, name: str) -> Path:
        return save_checkpoint(self._state(), self.output / name)

    def _resume(self, path) -> None:
        ckpt = load_training_checkpoint(path)
        if ckpt.get('task', 'classification') != self.task.name:
            raise CheckpointError(f'{path}: a checkpoint of a {ckpt.get("task")} run, this run is {self.task.name}')
        saved = ckpt.get('identity', {})
        for key, mine in self.task.identity().items():
            if saved.get(key) != mine:
                raise CheckpointError(f'{path}: the checkpoint is for {key}={saved.get(key)!r}, this run has {mine!r}')
        for key in _RESUME_KEYS + tuple(self.task.resume_keys):
            if ckpt['recipe'].get(key) != self.recipe.get(key):
                raise CheckpointError(f'{path}: recipe {key} was {ckpt["recipe"].get(key)!r}, now '
                                      f'{self.recipe.get(key)!r}; resuming needs the same recipe (start a new run '
                                      f'instead)')
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
        self.num_updates, self.best = ckpt['num_updates'], ckpt['best']
        self._window = ckpt['window']
        self.log = MetricsLog(self.output, self.info.is_main, ckpt['history'])
        self.log.truncate_file()  # rows logged after the checkpoint are redone
        set_rng_state(ckpt['rng'])

    # ------------------------------------------------------------------ training
    def _autocast(self):
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def _context(self, is_ema: bool = False) -> StepContext:
        return StepContext(recipe=self.recipe, device=self.info.device, info=self.info, epoch=self.epoch,
                           step=self.num_updates, ema=self.ema.module if self.ema is not None else None,
                           autocast=self._autocast, output=self.output, is_ema=is_ema)

    def _loader(self, epoch: int, skip_batches: int) -> DataLoader:
        batch = self.recipe['batch_size']
        self.sampler.set_epoch(epoch)
        self.seeded_set.set_epoch(epoch)
        indices = list(self.sampler)[skip_batches * batch:]
        return DataLoader(self.seeded_set, batch_size=batch, sampler=indices, drop_last=True,
                          num_workers=self.recipe['num_workers'], worker_init_fn=seed_worker,
                          persistent_workers=False, collate_fn=self.task.collate_fn())

    def _update(self, batch) -> None:
        recipe, info = self.recipe, self.info
        seed_all(derive_seed(recipe['seed'], self.num_updates, info.rank))
        batch = move_to(batch, info.device)
        ctx = self._context()
        with self._autocast():
            loss, logs = self.task.train_step(self.ddp, batch, ctx)
        if not torch.isfinite(loss):
            raise RuntimeError(f'the loss is {loss.item()} at update {self.num_updates + 1} (epoch {self.epoch + 1}; '
                               f'lr {self.optimizer.param_groups[0]["lr"]:.3g}); lower the lr or use amp=bf16/none')
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
        window = self._window
        window['steps'] += 1
        window['samples'] += _batch_len(batch)
        for key, value in dict(logs, loss=loss.detach()).items():
            window['sums'][key] = window['sums'].get(key, 0.0) + float(value)

    def _evaluate(self, row: Dict[str, Any]) -> None:
        for prefix, model in (('', self.model), ('ema_', self.ema.module if self.ema is not None else None)):
            if model is None:
                continue
            ctx = self._context(is_ema=bool(prefix))
            was_training = model.training
            model.eval()
            with torch.no_grad(), self._autocast():
                metrics = self.task.evaluate(model, self.val_loader, ctx)
            model.train(was_training)
            row.update({f'{prefix}{k}': v for k, v in metrics.items()})

    def _log_point(self, evaluate: bool) -> None:
        elapsed = time.perf_counter() - self._window_started
        window = self._window
        keys = sorted(window['sums'])
        totals = all_reduce_sum([window['sums'][k] for k in keys] + [window['steps'], window['samples']], self.info)
        steps, samples = totals[-2], totals[-1]
        means = {k: v / steps for k, v in zip(keys, totals)} if steps else {}
        row: Dict[str, Any] = {} if self.step_based else dict(epoch=self.epoch)
        row.update(step=self.num_updates, train_loss=means.pop('loss', float('nan')), **means,
                   lr=self.optimizer.param_groups[0]['lr'], time_s=elapsed,
                   train_img_s=samples / elapsed if elapsed > 0 else 0.0)
        if evaluate and self.val_loader is not None:
            self._evaluate(row)
        self._window = self._empty_window()
        self._window_started = time.perf_counter()
        self.log.append(row, 'step' if self.step_based else 'epoch')
        if self.info.is_main:
            metric, improved = self.task.best_metric, False
            if metric and metric in row:
                improved = self.best is None or (row[metric] > self.best if self.task.best_mode == 'max'
                                                 else row[metric] < self.best)
                if improved:
                    self.best = row[metric]
            self.save('last.pth')
            if improved:
                self.save('best.pth')
            print(json.dumps({k: (float(f'{v:.5g}') if isinstance(v, float) else v) for k, v in row.items()}),
                  flush=True)
        barrier(self.info)

    def _due(self, every: int) -> bool:
        return bool(every) and self.num_updates % every == 0

    def _run_epoch(self, bar) -> None:
        recipe = self.recipe
        epoch, skip = divmod(self.num_updates, self.iters_per_epoch)
        own_bar = bar is None and self.progress
        if own_bar:
            bar = progress_bar(self.iters_per_epoch, f'epoch {epoch + 1}/{recipe["epochs"]}', True, initial=skip)
        self.ddp.train()
        for batch in self._loader(epoch, skip):
            if self.num_updates >= self.total_updates:
                break
            self._update(batch)
            if bar is not None:
                sums, steps = self._window['sums'], self._window['steps']
                seconds = max(time.perf_counter() - self._window_started, 1e-9)
                rate = self._window['samples'] * self.info.world_size / seconds
                bar.set_postfix(loss=f'{sums["loss"] / steps:.4f}', lr=f'{self.optimizer.param_groups[0]["lr"]:.2e}',
                                img_s=f'{rate:.0f}')
                bar.update()
            if self.step_based:
                last = self.num_updates == self.total_updates
                if self._due(recipe['eval_every']) or last:
                    self._log_point(True)
                    continue
            if self._due(recipe['checkpoint_every']) and self.num_updates % self.iters_per_epoch and \
                    self.info.is_main:
                self.save('last.pth')
        if own_bar and bar is not None:
            bar.close()
        if not self.step_based and self.num_updates % self.iters_per_epoch == 0:
            done = self.epoch
            due = recipe['eval_every'] and done % recipe['eval_every'] == 0
            self._log_point(due or done == recipe['epochs'])

    def fit(self) -> List[Dict[str, Any]]:
        if self.info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output / 'recipe.yaml', lambda tmp: Path(tmp).write_text(recipe_yaml(self.recipe)))
        bar = progress_bar(self.total_updates, 'steps', True, initial=self.num_updates) \
            if self.step_based and self.progress else None
        while self.num_updates < self.total_updates:
            self._run_epoch(bar)
        if bar is not None:
            bar.close()
        self.log.close()
        if self.info.is_main and self.history:
            try:
                self.task.report(self.history, self.output)
            except ImportError as e:  # matplotlib is optional: metrics.csv / .jsonl hold the same numbers
                print(f'no report: {e}', file=sys.stderr)
        return self.history
