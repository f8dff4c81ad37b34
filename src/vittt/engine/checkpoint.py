"""Training checkpoints: written atomically, read with ``weights_only``, refused with a reason when they do not fit."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from ..io import atomic_write
from ..models.official import CheckpointError, load_checkpoint_file

__all__ = ['CHECKPOINT_FORMAT', 'WEIGHT_FORMATS', 'CheckpointError', 'save_checkpoint', 'load_training_checkpoint']

CHECKPOINT_FORMAT = 'vittt-train-2'
#: formats whose ``model`` / ``ema`` / ``recipe`` / ``model_name`` / ``num_classes`` evaluation can read
#: ('vittt-train-1': the classification trainer before the engine, which cannot be resumed by it)
WEIGHT_FORMATS = ('vittt-train-1', CHECKPOINT_FORMAT)


def save_checkpoint(state: Dict[str, Any], path) -> Path:
    """``state`` (tensors, numbers, strings, lists and dicts only) to ``path``, whole or not at all."""
    return atomic_write(path, lambda tmp: torch.save(dict(state, format=CHECKPOINT_FORMAT), tmp))


def load_training_checkpoint(path) -> Dict[str, Any]:
    """Read a checkpoint written by the :class:`~vittt.engine.Trainer`, or raise CheckpointError saying why."""
    ckpt = load_checkpoint_file(path)
    if isinstance(ckpt, dict) and ckpt.get('format') in WEIGHT_FORMATS and ckpt['format'] != CHECKPOINT_FORMAT:
        raise CheckpointError(f'{path}: written by an older vittt (format {ckpt["format"]!r}), which this engine '
                              f'cannot resume; its weights still evaluate (vittt eval --checkpoint); start a new run')
    if not isinstance(ckpt, dict) or ckpt.get('format') != CHECKPOINT_FORMAT:
        raise CheckpointError(f'{path}: not a vittt training checkpoint (no format {CHECKPOINT_FORMAT!r}); '
                              f'for model weights use vittt eval --checkpoint')
    return ckpt
