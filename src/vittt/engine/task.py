"""The task contract the :class:`~vittt.engine.Trainer` drives, and the registry recipes name tasks in.

A task is what differs between classification, generation and dense prediction; everything else (distribution,
seeding, checkpoints and resume, AMP, clipping, EMA, schedules, logging, curves) is the engine's. A task subclass
registers itself with :func:`register_task` (``import vittt`` imports the package's tasks); the engine never
imports a task.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Type

import torch
from torch import nn

__all__ = ['Task', 'StepContext', 'register_task', 'get_task', 'registered_tasks']

_TASKS: Dict[str, Type['Task']] = {}


@dataclass
class StepContext:
    """What a task's step and evaluation may use besides the model and the batch."""
    recipe: Dict[str, Any]
    device: torch.device
    info: Any                      #: :class:`~vittt.engine.DistInfo`
    epoch: int                     #: 0-based epoch the update belongs to
    step: int                      #: updates done before this one
    ema: Optional[nn.Module]       #: the EMA model (eval mode) when the run keeps one
    autocast: Callable[[], AbstractContextManager]  #: the run's AMP context (a no-op without AMP)
    output: Optional[Path] = None  #: the run folder (rank 0 writes there)
    is_ema: bool = False           #: in ``evaluate``: whether the model evaluated is the EMA model


class Task:
    """Subclass and register; every method but :meth:`train_step` and :meth:`evaluate` has a default.

    Class attributes:
      ``name``          the recipe's ``task`` value;
      ``defaults``      the recipe keys the task adds to the engine's, with their defaults (official values);
      ``best_metric``   the evaluation metric that picks ``best.pth`` (None: no best checkpoint);
      ``best_mode``     ``'max'`` or ``'min'``;
      ``resume_keys``   recipe keys (beyond the engine's batch size, run length and seed) a resumed run must share;
      ``produces``      what its checkpoints hold, in errors that refuse another task's (default: "a <name> run").
    """
    name: str = ''
    defaults: Dict[str, Any] = {}
    best_metric: Optional[str] = None
    best_mode: str = 'max'
    resume_keys: Tuple[str, ...] = ()
    produces: str = ''

    def __init__(self, recipe: Dict[str, Any]):
        self.recipe = recipe

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any], **options) -> 'Task':
        """The task that wrote the training checkpoint ``ckpt``, rebuilt from its ``recipe`` and ``identity`` well
        enough to :meth:`build_model` (no data is read); see :func:`vittt.engine.load_trained_model`."""
        raise NotImplementedError(f'the {cls.name} task cannot rebuild its model from a checkpoint')

    # -------------------------------------------------------------------- what the engine calls
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def identity(self) -> Dict[str, Any]:
        """What a checkpoint must agree on to resume into this run (stored in it; default: the model name)."""
        return dict(model_name=self.recipe['model'])

    def uses_ema(self) -> bool:
        """Whether the run needs an EMA model besides ``model_ema`` (e.g. as a teacher)."""
        return False

    def collate_fn(self) -> Optional[Callable]:
        return None

    def train_step(self, model: nn.Module, batch: Any, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, float]]:
        """One forward on a batch (already on the device, inside ``ctx.autocast()``): the loss to minimise and any
        scalars to average into the log (besides the loss)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader, ctx: StepContext) -> Dict[str, float]:
        """Metrics of ``model`` (eval mode) over the loader, summed across processes (the loader is sharded)."""
        raise NotImplementedError

    def report(self, history, output, title: Optional[str] = None) -> None:
        """Write the task's report into the run folder at the end (default: loss and metric curves)."""
        from .plots import plot_runs
        plot_runs({title or self.recipe['model']: history}, output / 'curves.png', title=title or self.recipe['model'],
                  metric=self.best_metric)


def register_task(cls: Type[Task]) -> Type[Task]:
    """Class decorator: make ``cls`` the task recipes name by ``cls.name``."""
    if not cls.name:
        raise ValueError(f'{cls.__name__} has no name')
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Type[Task]:
    if name not in _TASKS:
        raise KeyError(f'unknown task {name!r}; known: {sorted(_TASKS)}')
    return _TASKS[name]


def registered_tasks() -> Dict[str, Type[Task]]:
    return dict(_TASKS)
