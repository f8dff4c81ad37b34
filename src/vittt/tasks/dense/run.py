"""What ``vittt dense train`` and ``vittt dense eval`` do.

``data`` is a dataset folder — the output of ``vittt data make-dense``, COCO 2017 (``annotations/instances_*2017.json``
+ ``train2017/`` / ``val2017/``) for detection, ADE20K (``ADEChallengeData2016``) for segmentation — or
``fmnist-dense``: the default offline set (4,000 / 500 Fashion-MNIST canvases at 192²), generated once into
``$VITTT_DATA/fmnist-dense`` (default ``~/.cache/vittt``).
"""
from __future__ import annotations

import json
import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ...engine import DistInfo, StepContext, Trainer, eval_loader, load_training_checkpoint
from ...io import atomic_write
from .task import DetectionTask, SegmentationTask

__all__ = ['DEFAULT_DENSE_DATA', 'resolve_dense_data', 'build_dense_datasets', 'build_task', 'train',
           'load_dense_checkpoint', 'evaluate_checkpoint', 'SegmentationTrainTransform']

DEFAULT_DENSE_DATA = 'fmnist-dense'


def default_data_root() -> Path:
    return Path(os.environ.get('VITTT_DATA', '~/.cache/vittt')).expanduser()


def resolve_dense_data(data, info: Optional[DistInfo] = None) -> Path:
    """The dataset folder of ``data``; ``'fmnist-dense'`` is generated on first use (by rank 0)."""
    if str(data) != DEFAULT_DENSE_DATA:
        path = Path(data).expanduser()
        if not path.exists():
            raise FileNotFoundError(f'dense dataset folder {path} does not exist (make one with `vittt data '
                                    f'make-dense --out {path}`, or use --data {DEFAULT_DENSE_DATA})')
        return path
    from ...data import is_dense_dataset, make_dense_dataset
    from ...engine import barrier
    folder = default_data_root() / DEFAULT_DENSE_DATA
    if (info is None or info.is_main) and not is_dense_dataset(folder, complete=True):
        print(f'generating the offline dense dataset into {folder} (once)', flush=True)
        make_dense_dataset(folder)
    if info is not None:
        barrier(info)
    return folder


class SegmentationTrainTransform(Dataset):
    """Training augmentation of the official segmentation recipe on ``(image, label)`` pairs: a random rescale by a
    factor in ``scale_range`` (bilinear image, nearest label), then a random ``crop_size`` crop (padded with image 0
    / label 255 when smaller). Random draws come from Python's ``random`` (seeded per sample by the engine)."""

    def __init__(self, dataset, crop_size: Optional[int], scale_range: Optional[Tuple[float, float]]):
        self.dataset, self.crop_size, self.scale_range = dataset, crop_size, scale_range

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        if self.scale_range:
            factor = random.uniform(*self.scale_range)
            size = [max(1, int(round(s * factor))) for s in image.shape[-2:]]
            image = F.interpolate(image[None], size=size, mode='bilinear', align_corners=False)[0]
            label = F.interpolate(label[None, None].float(), size=size, mode='nearest')[0, 0].long()
        if self.crop_size:
            c = self.crop_size
            h, w = image.shape[-2:]
            ph, pw = max(c - h, 0), max(c - w, 0)
            if ph or pw:
                image = F.pad(image, (0, pw, 0, ph))
                label = F.pad(label, (0, pw, 0, ph), value=255)
                h, w = image.shape[-2:]
            y, x = random.randint(0, h - c), random.randint(0, w - c)
            image, label = image[:, y:y + c, x:x + c], label[y:y + c, x:x + c]
        return image, label


def build_dense_datasets(data, recipe: Dict[str, Any], info: Optional[DistInfo] = None):
    """``(train_set, val_set)`` of the recipe's task on ``data``."""
    from ...data import CocoInstances, SemanticMaps
    root = resolve_dense_data(data, info)
    if recipe['task'] == 'detection':
        return (CocoInstances(root, 'train', train=True, hflip=recipe['hflip']), CocoInstances(root, 'val'))
    train_set = SemanticMaps(root, 'train', train=True, hflip=recipe['hflip'])
    if recipe.get('crop_size') or recipe.get('scale_range'):
        train_set = SegmentationTrainTransform(train_set, recipe.get('crop_size'), recipe.get('scale_range'))
    return train_set, SemanticMaps(root, 'val')


def build_task(recipe: Dict[str, Any], val_set):
    """The task of ``recipe`` with what it needs from the (validation) data."""
    if recipe['task'] == 'detection':
        return DetectionTask(recipe, val_set.num_classes, val_set.coco, val_set.label_to_cat_id, val_set.class_names)
    if recipe['task'] == 'segmentation':
        return SegmentationTask(recipe, val_set.num_classes, val_set.class_names)
    raise ValueError(f'vittt dense runs detection and segmentation recipes, not {recipe["task"]!r}')


def train(recipe: Dict[str, Any], data, output, info: DistInfo, resume: Optional[str] = None,
          progress: bool = True) -> List[Dict[str, Any]]:
    """Fit ``recipe`` on ``data``; the run's history."""
    train_set, val_set = build_dense_datasets(data, recipe, info)
    task = build_task(recipe, val_set)
    return Trainer(task, train_set, val_set, output, info, resume=resume, progress=progress).fit()


def load_dense_checkpoint(checkpoint, val_set=None, use_ema: bool = True, device='cpu', ckpt=None):
    """``(task, model, ckpt)`` from a ``vittt dense train`` checkpoint (the EMA weights when the run kept them);
    ``ckpt``: the checkpoint already loaded from that file."""
    ckpt = ckpt if ckpt is not None else load_training_checkpoint(checkpoint)
    recipe = ckpt['recipe']
    if recipe.get('task') not in ('detection', 'segmentation'):
        raise ValueError(f'{checkpoint}: a {recipe.get("task")!r} checkpoint, not a detection / segmentation one')
    if val_set is None:  # the class count is part of the run's identity
        num_classes = recipe.get('num_classes') or ckpt.get('identity', {}).get('num_classes')
        if not num_classes:
            raise ValueError(f'{checkpoint}: give the dataset (the checkpoint does not record its class count)')
        task = (DetectionTask if recipe['task'] == 'detection' else SegmentationTask)(recipe, num_classes)
    else:
        task = build_task(recipe, val_set)
    model = task.build_model()
    weights = ckpt['ema'] if use_ema and ckpt.get('ema') is not None else ckpt['model']
    model.load_state_dict(weights)
    return task, model.to(device).eval(), ckpt


def evaluate_checkpoint(checkpoint, data, info: DistInfo, split: str = 'val', output=None, use_ema: bool = True,
                        batch_size: Optional[int] = None, subset: int = 0) -> Dict[str, Any]:
    """Score a checkpoint on ``split`` of ``data``; writes ``<checkpoint>.dense-eval.json`` (and the COCO results
    of a detector beside it); returns the metrics with the file names."""
    from ...data import CocoInstances, SemanticMaps, first_n
    ckpt = load_training_checkpoint(checkpoint)
    recipe = ckpt['recipe']
    root = resolve_dense_data(data, info)
    dataset = CocoInstances(root, split) if recipe['task'] == 'detection' else SemanticMaps(root, split)
    task, model, ckpt = load_dense_checkpoint(checkpoint, dataset, use_ema, info.device, ckpt=ckpt)
    dataset = first_n(dataset, subset)
    loader = eval_loader(dataset, batch_size or recipe['batch_size'], 0, info, task.collate_fn())
    ctx = StepContext(recipe=recipe, device=info.device, info=info, epoch=ckpt['epoch'], step=ckpt['num_updates'],
                      ema=None, autocast=nullcontext)
    output = Path(output) if output else Path(f'{checkpoint}.dense-eval.json')
    with torch.no_grad():
        if recipe['task'] == 'detection':
            results, ids = task.predict(model, loader, ctx)
            from ...dense import coco_evaluate
            types = ('bbox', 'segm') if task.masks else ('bbox',)
            metrics = {k: (100.0 * float(v) if v >= 0 else None)  # pycocotools' -1: no ground truth of that size
                       for k, v in coco_evaluate(task.coco_gt, results, types, ids).items()}
        else:
            from ...dense import miou
            full = miou(task.confusion(model, loader, ctx))
            metrics = {k: 100.0 * full[k] for k in ('mIoU', 'aAcc', 'mAcc')}
            metrics['IoU'] = dict(zip(task.class_names or range(task.num_classes),
                                      [100.0 * v for v in full['IoU']]))
    result = dict(checkpoint=str(checkpoint), task=recipe['task'], model=recipe['model'], split=split,
                  images=len(dataset), step=ckpt['num_updates'], weights='ema' if use_ema and ckpt.get('ema')
                  else 'model', metrics=metrics, output=str(output))
    if info.is_main:
        if recipe['task'] == 'detection':
            result['predictions'] = str(output.with_suffix('.predictions.json'))
            atomic_write(result['predictions'], lambda tmp: Path(tmp).write_text(json.dumps(results)))
        atomic_write(output, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return result
