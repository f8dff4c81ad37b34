"""Training checkpoints: written atomically, read with ``weights_only``, refused with a reason when they do not fit."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..io import atomic_write
from ..models.official import CheckpointError, check_state_dict, load_checkpoint_file

__all__ = ['CHECKPOINT_FORMAT', 'WEIGHT_FORMATS', 'CheckpointError', 'save_checkpoint', 'load_training_checkpoint',
           'is_weight_checkpoint', 'load_trained_model', 'load_model_weights']

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


def is_weight_checkpoint(ckpt) -> bool:
    """Whether a loaded checkpoint was written by a vittt trainer (this engine's or the one before it)."""
    return isinstance(ckpt, dict) and ckpt.get('format') in WEIGHT_FORMATS


def load_trained_model(checkpoint, use_ema: bool = True, model_name: Optional[str] = None, *,
                       task: Optional[str] = None, source: Optional[str] = None, **options):
    """``(task, model in eval mode)`` from a checkpoint written by a vittt trainer (a path, or the loaded dict), for
    any task: the task is rebuilt from the checkpoint's recipe and identity by its ``Task.from_checkpoint(ckpt,
    **options)`` (no data needed), its model gets the EMA weights unless ``use_ema`` is False (or the run kept no
    EMA), keys and shapes checked strictly. ``model_name`` / ``task``: refuse a checkpoint of another model / task;
    ``source``: the file named in errors when ``checkpoint`` is already loaded."""
    from .task import get_task

    where = source or ('the checkpoint' if isinstance(checkpoint, dict) else str(checkpoint))
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(checkpoint)
    if not is_weight_checkpoint(ckpt):
        raise CheckpointError(f'{where}: not a vittt training checkpoint (no format in {WEIGHT_FORMATS})')
    # the classification trainer before the engine ('vittt-train-1') stored no task and the identity at the top
    kind = ckpt.get('task') or 'classification'
    if task is not None and kind != task:
        wanted = get_task(task)
        raise ValueError(f'{where} is a checkpoint of a {kind} run, not of {wanted.produces or f"a {task} run"}')
    identity = ckpt.get('identity') or dict(model_name=ckpt.get('model_name'), num_classes=ckpt.get('num_classes'))
    if model_name is not None and identity.get('model_name') != model_name:
        raise ValueError(f'{where} holds a {identity.get("model_name")}, not a {model_name}')
    rebuilt = get_task(kind).from_checkpoint(dict(ckpt, identity=identity), **options)
    model = rebuilt.build_model()
    state = ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model']
    check_state_dict(state, model)
    model.load_state_dict(state)
    return rebuilt, model.eval()


def load_model_weights(model_name: str, checkpoint, use_ema: bool = True,
                       img_size: Optional[int] = None) -> Tuple[torch.nn.Module, int, int]:
    """``(model in eval mode, in_chans, img_size)`` of the image model ``model_name`` with ``checkpoint``'s weights:
    a classification training checkpoint of the engine (its recipe's channels and size, dropout off), or an
    official ``.pth`` / converted ``.safetensors`` (3 channels, 224); keys are checked strictly. ``img_size``
    builds the model for another resolution."""
    import timm
    from ..models.official import convert_official_state_dict

    raw = load_checkpoint_file(checkpoint)
    if is_weight_checkpoint(raw):
        task, model = load_trained_model(raw, use_ema, model_name, task='classification', source=str(checkpoint),
                                         img_size=img_size)
        return model, int(task.recipe['in_chans']), int(task.recipe['img_size'])
    state = convert_official_state_dict(raw, use_ema=use_ema)
    num_classes = state['head.weight'].shape[0] if 'head.weight' in state else 1000
    model = timm.create_model(model_name, num_classes=num_classes)  # (ViT³ models take any size as built)
    check_state_dict(state, model)
    model.load_state_dict(state)
    return model.eval(), 3, img_size or 224
