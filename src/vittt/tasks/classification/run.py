"""What ``vittt train`` / ``vittt eval`` do for classification: datasets from the recipe, the engine, the report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...engine import DistInfo, Trainer, eval_loader, load_training_checkpoint  # noqa: F401
from ...engine.checkpoint import WEIGHT_FORMATS
from .task import ClassificationTask, build_model, evaluate

__all__ = ['train', 'load_for_eval', 'evaluate_checkpoint']


def train(recipe: Dict[str, Any], data, output, info: DistInfo, resume: Optional[str] = None,
          progress: bool = True) -> List[Dict[str, Any]]:
    """Fit ``recipe['model']`` on ``data`` (see :func:`vittt.data.build_datasets`); the run's history."""
    from ...data import build_datasets

    train_set, val_set, num_classes = build_datasets(data, recipe)
    task = ClassificationTask(recipe, num_classes)
    return Trainer(task, train_set, val_set, output, info, resume=resume, progress=progress).fit()


def load_for_eval(model_name: str, checkpoint, use_ema: bool = True, img_size: Optional[int] = None):
    """``(model, in_chans, img_size)`` from a training checkpoint of the engine (its recipe's channels and size),
    an official ``.pth`` or a converted ``.safetensors`` (3 channels, 224); keys are checked strictly."""
    import timm
    from ...models.official import check_state_dict, convert_official_state_dict, load_checkpoint_file

    raw = load_checkpoint_file(checkpoint)
    if isinstance(raw, dict) and raw.get('format') in WEIGHT_FORMATS:
        identity = raw.get('identity') or dict(model_name=raw.get('model_name'), num_classes=raw.get('num_classes'))
        if identity.get('model_name') != model_name:
            raise ValueError(f'{checkpoint} holds a {identity.get("model_name")}, not a {model_name}')
        state = raw['ema'] if use_ema and raw.get('ema') is not None else raw['model']
        recipe = dict(raw['recipe'], drop_path=0.0, drop=0.0)
        recipe['img_size'] = img_size or recipe['img_size']
        model, in_chans, size = build_model(recipe, identity['num_classes']), recipe['in_chans'], recipe['img_size']
    else:
        state = convert_official_state_dict(raw, use_ema=use_ema)
        num_classes = state['head.weight'].shape[0] if 'head.weight' in state else 1000
        model, in_chans, size = timm.create_model(model_name, num_classes=num_classes), 3, img_size or 224
    check_state_dict(state, model)
    model.load_state_dict(state)
    return model, in_chans, size


def evaluate_checkpoint(model_name: str, checkpoint, data, info: DistInfo, img_size: Optional[int] = None,
                        crop_pct: Optional[float] = None, batch_size: int = 100, workers: int = 2,
                        subset: Optional[int] = None, use_ema: bool = True, output=None) -> Dict[str, Any]:
    """Top-1 / top-5 / loss of a checkpoint on ``data``'s validation split with the official eval transform, at
    ``img_size`` (default: the training resolution of an engine checkpoint, else 224); the result is also written
    as JSON (``output``, default ``<checkpoint>.eval.json``) by rank 0."""
    from ...data import build_datasets, first_n
    from ...engine import load_recipe
    from ...io import atomic_write

    model, in_chans, img_size = load_for_eval(model_name, checkpoint, use_ema, img_size)
    recipe = load_recipe(None, dict(model=model_name, img_size=img_size, in_chans=in_chans,
                                    **({'crop_pct': crop_pct} if crop_pct is not None else {})))
    model = model.to(info.device)
    _, val_set, _ = build_datasets(data, recipe, train=False)
    val_set = first_n(val_set, subset)
    metrics = evaluate(model, eval_loader(val_set, batch_size, workers, info), info)
    result = dict(model=model_name, checkpoint=str(checkpoint), data=str(data), img_size=img_size,
                  crop_pct=recipe['crop_pct'], top1=metrics['top1'], top5=metrics['top5'],
                  loss=metrics['val_loss'], count=metrics['count'])
    if info.is_main:
        out = Path(output) if output else Path(checkpoint).with_suffix('.eval.json')
        atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + '\n'))
        result['output'] = str(out)
    return result

