"""What ``vittt train`` / ``vittt eval`` do for classification: datasets from the recipe, the engine, the report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...engine import DistInfo, Trainer, eval_loader, load_model_weights, load_training_checkpoint  # noqa: F401
from .task import ClassificationTask, evaluate

__all__ = ['train', 'evaluate_checkpoint']


def train(recipe: Dict[str, Any], data, output, info: DistInfo, resume: Optional[str] = None,
          progress: bool = True) -> List[Dict[str, Any]]:
    """Fit ``recipe['model']`` on ``data`` (see :func:`vittt.data.build_datasets`); the run's history."""
    from ...data import build_datasets

    train_set, val_set, num_classes = build_datasets(data, recipe)
    task = ClassificationTask(recipe, num_classes)
    return Trainer(task, train_set, val_set, output, info, resume=resume, progress=progress).fit()


def evaluate_checkpoint(model_name: str, checkpoint, data, info: DistInfo, img_size: Optional[int] = None,
                        crop_pct: Optional[float] = None, batch_size: int = 100, workers: int = 2,
                        subset: Optional[int] = None, use_ema: bool = True, output=None) -> Dict[str, Any]:
    """Top-1 / top-5 / loss of a checkpoint on ``data``'s validation split with the official eval transform, at
    ``img_size`` (default: the training resolution of an engine checkpoint, else 224); the result is also written
    as JSON (``output``, default ``<checkpoint>.eval.json``) by rank 0."""
    from ...data import build_datasets, first_n
    from ...engine import load_recipe
    from ...io import atomic_write

    model, in_chans, img_size = load_model_weights(model_name, checkpoint, use_ema, img_size)
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

