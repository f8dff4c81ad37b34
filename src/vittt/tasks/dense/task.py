"""Detection / instance segmentation and semantic segmentation as engine tasks.

:class:`DetectionTask` (``task: detection``) trains a torchvision detector (:func:`vittt.dense.build_detector`) on
batches ``(list of images [3, H, W] in [0, 1], list of target dicts)``: the loss is the sum of the detector's loss
dict, whose parts are logged. Evaluation runs the detector on the validation shard, gathers the COCO results of
every process and scores them with pycocotools against the validation annotations (box AP and, for Mask R-CNN,
mask AP; in percent, as papers report them). Targets are checked before every step: a box outside the image or
without area, a label outside 1..num_classes or a mask of the wrong size is an error naming the image; an image
without objects is fine.

:class:`SegmentationTask` (``task: segmentation``) trains :func:`vittt.dense.build_upernet` with cross-entropy
(ignore index 255) plus ``aux_weight`` × the auxiliary head's; evaluation accumulates one dataset-level confusion
matrix over every process and reports mIoU, aAcc and mAcc in percent.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...engine import StepContext, Task, all_gather_objects, all_reduce_sum, register_task

__all__ = ['DetectionTask', 'SegmentationTask', 'TargetError', 'check_detection_targets', 'check_segmentation_labels',
           'segmentation_collate', 'DETECTION_DEFAULTS', 'SEGMENTATION_DEFAULTS']

# Both tasks: the official dense recipes' optimiser (AdamW, betas 0.9 / 0.999) with CPU-scale defaults; the shipped
# YAML recipes set the rest (configs/dense/).
_COMMON = dict(
    epochs=12, batch_size=4, lr=2e-4, lr_base_batch=None, warmup_lr=2e-7, min_lr=0.0, warmup_epochs=0,
    warmup_steps=1000, weight_decay=0.05, clip_grad=None, num_workers=2, eval_every=1,
    image_size=None, num_classes=None, hflip=0.5, backbone_checkpoint=None, frozen_stages=-1, norm_eval=False,
)
DETECTION_DEFAULTS: Dict[str, Any] = dict(_COMMON, detector='maskrcnn', preset='official', mmdet_compat=False,
                                          sched='step', decay_milestones=[8, 11])
SEGMENTATION_DEFAULTS: Dict[str, Any] = dict(_COMMON, lr=6e-5, weight_decay=0.01, sched='poly', epochs=None,
                                             steps=160_000, warmup_steps=1500, eval_every=16_000, decoder_channels=512,
                                             aux_head=True, aux_weight=0.4, head_mode='mmseg', crop_size=None,
                                             scale_range=None)


class TargetError(ValueError):
    """A training target that cannot be used; the message names the image and the problem."""


def _image_name(target: Dict[str, Any], index: int) -> str:
    image_id = target.get('image_id') if isinstance(target, dict) else None
    if isinstance(image_id, torch.Tensor):
        image_id = int(image_id)
    return f'image {image_id}' if image_id is not None else f'image {index} of the batch'


def check_detection_targets(images: Sequence[torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]],
                            num_classes: int, masks: bool) -> None:
    """Raise :class:`TargetError` unless every target fits its image (see the module docstring)."""
    if len(images) != len(targets):
        raise TargetError(f'{len(images)} images but {len(targets)} targets')
    for i, (image, target) in enumerate(zip(images, targets)):
        name = _image_name(target, i)
        if image.dim() != 3 or image.shape[0] != 3:
            raise TargetError(f'{name}: images are [3, H, W], got shape {tuple(image.shape)}')
        h, w = image.shape[-2:]
        for key in ('boxes', 'labels') + (('masks',) if masks else ()):
            if key not in target:
                raise TargetError(f'{name}: the target has no {key!r} (keys: {sorted(target)})')
        boxes, labels = target['boxes'], target['labels']
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise TargetError(f'{name}: boxes are [N, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}')
        if labels.shape != boxes.shape[:1]:
            raise TargetError(f'{name}: {len(boxes)} boxes but labels of shape {tuple(labels.shape)}')
        if len(boxes):
            bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            if bad.any():
                k = int(bad.nonzero()[0])
                raise TargetError(f'{name}: box {k} {boxes[k].tolist()} has no area (x2 <= x1 or y2 <= y1)')
            eps = 1e-3
            out = (boxes[:, 0] < -eps) | (boxes[:, 1] < -eps) | (boxes[:, 2] > w + eps) | (boxes[:, 3] > h + eps)
            if out.any():
                k = int(out.nonzero()[0])
                raise TargetError(f'{name}: box {k} {boxes[k].tolist()} lies outside the {w}x{h} image')
            low, high = int(labels.min()), int(labels.max())
            if low < 1 or high > num_classes:
                raise TargetError(f'{name}: labels must be in 1..{num_classes} (0 is the background), got '
                                  f'{low}..{high}')
        if masks:
            m = target['masks']
            if m.dim() != 3 or tuple(m.shape) != (len(boxes), h, w):
                raise TargetError(f'{name}: masks must be [N, H, W] = [{len(boxes)}, {h}, {w}], got '
                                  f'{tuple(m.shape)}')


def check_segmentation_labels(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> None:
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
        raise TargetError(f'segmentation labels must be in 0..{num_classes - 1} or {ignore_index} (ignored), got '
                          f'{int(valid.min())}..{int(valid.max())}')


def _percent(metrics: Dict[str, float]) -> Dict[str, float]:
    return {k: 100.0 * v for k, v in metrics.items()}


def _num_classes(recipe: Dict[str, Any], from_data: Optional[int], task: str) -> int:
    """The recipe's class count, else the data's; an error when neither gives one."""
    count = recipe['num_classes'] or from_data
    if not count:
        raise ValueError(f'the {task} task needs num_classes (from the data or the recipe)')
    return count


def _recipe_backbone_kwargs(recipe: Dict[str, Any]) -> Dict[str, Any]:
    kwargs = dict(recipe.get('model_kwargs') or {})
    kwargs.update(checkpoint=recipe['backbone_checkpoint'], frozen_stages=recipe['frozen_stages'],
                  norm_eval=recipe['norm_eval'])
    return kwargs


@register_task
class DetectionTask(Task):
    """``recipe`` + the data's class count and validation annotations (``coco_gt``, a pycocotools COCO, and the
    label → category id map). ``best.pth`` by the highest box AP."""
    name = 'detection'
    defaults = DETECTION_DEFAULTS
    best_metric, best_mode = 'bbox_AP', 'max'
    resume_keys = ('detector', 'preset', 'image_size', 'num_classes', 'mmdet_compat')

    def __init__(self, recipe: Dict[str, Any], num_classes: Optional[int] = None, coco_gt=None,
                 label_to_cat_id: Optional[Dict[int, int]] = None, class_names: Optional[List[str]] = None):
        super().__init__(recipe)
        self.num_classes = _num_classes(recipe, num_classes, self.name)
        self.coco_gt, self.class_names = coco_gt, class_names
        self.label_to_cat_id = label_to_cat_id or {k: k for k in range(1, self.num_classes + 1)}
        self.masks = recipe['detector'] == 'maskrcnn'

    def identity(self) -> Dict[str, Any]:
        return dict(model_name=self.recipe['model'], detector=self.recipe['detector'], num_classes=self.num_classes)

    def build_model(self) -> nn.Module:
        from ...dense import build_detector
        r = self.recipe
        return build_detector(r['detector'], r['model'], self.num_classes, preset=r['preset'],
                              mmdet_compat=r['mmdet_compat'], image_size=r['image_size'],
                              backbone_kwargs=_recipe_backbone_kwargs(r))

    def collate_fn(self):
        from ...data import dense_collate
        return dense_collate

    def train_step(self, model, batch, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, float]]:
        images, targets = batch
        check_detection_targets(images, targets, self.num_classes, self.masks)
        losses = model(list(images), [{k: v for k, v in t.items() if k in ('boxes', 'labels', 'masks')}
                                      for t in targets])
        loss = sum(losses.values())
        return loss, {k: v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def predict(self, model, loader, ctx: StepContext) -> Tuple[List[Dict[str, Any]], List[int]]:
        """COCO results and image ids of every process's shard."""
        from ...dense import detections_to_coco
        results, ids = [], []
        for images, targets in loader:
            images = [im.to(ctx.device) for im in images]
            with ctx.autocast():
                outputs = model(images)
            outputs = [{k: v.float().cpu() for k, v in out.items()} for out in outputs]
            image_ids = [int(t['image_id']) for t in targets]
            results += detections_to_coco(outputs, image_ids, self.label_to_cat_id)
            ids += image_ids
        gathered = all_gather_objects((results, ids), ctx.info)
        return [r for part, _ in gathered for r in part], sorted(i for _, part in gathered for i in part)

    def evaluate(self, model, loader, ctx: StepContext) -> Dict[str, float]:
        from ...dense import coco_evaluate
        if self.coco_gt is None:
            raise ValueError('the detection task evaluates against COCO annotations: pass coco_gt')
        results, ids = self.predict(model, loader, ctx)
        types = ('bbox', 'segm') if self.masks else ('bbox',)
        metrics = coco_evaluate(self.coco_gt, results, iou_types=types, img_ids=ids)
        keep = [f'{t}_{n}' for t in types for n in ('AP', 'AP50', 'AP75')]  # (by size: vittt dense eval)
        return _percent({k: float(metrics[k]) for k in keep})


def segmentation_collate(batch: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label)`` pairs; images of different sizes are padded bottom / right to the largest (image
    0, label 255 = ignored)."""
    h = max(im.shape[-2] for im, _ in batch)
    w = max(im.shape[-1] for im, _ in batch)
    images = torch.stack([F.pad(im, (0, w - im.shape[-1], 0, h - im.shape[-2])) for im, _ in batch])
    labels = torch.stack([F.pad(lb, (0, w - lb.shape[-1], 0, h - lb.shape[-2]), value=255) for _, lb in batch])
    return images, labels


@register_task
class SegmentationTask(Task):
    """``recipe`` + the data's class count. ``best.pth`` by the highest mIoU."""
    name = 'segmentation'
    defaults = SEGMENTATION_DEFAULTS
    best_metric, best_mode = 'mIoU', 'max'
    resume_keys = ('num_classes', 'decoder_channels', 'aux_head', 'head_mode', 'crop_size')
    ignore_index = 255

    def __init__(self, recipe: Dict[str, Any], num_classes: Optional[int] = None,
                 class_names: Optional[List[str]] = None):
        super().__init__(recipe)
        self.num_classes = _num_classes(recipe, num_classes, self.name)
        self.class_names = class_names

    def identity(self) -> Dict[str, Any]:
        return dict(model_name=self.recipe['model'], num_classes=self.num_classes)

    def build_model(self) -> nn.Module:
        from ...dense import build_upernet
        r = self.recipe
        return build_upernet(r['model'], self.num_classes, decoder_channels=r['decoder_channels'],
                             aux_head=r['aux_head'], head_mode=r['head_mode'],
                             backbone_kwargs=_recipe_backbone_kwargs(r))

    def collate_fn(self):
        return segmentation_collate

    def train_step(self, model, batch, ctx: StepContext) -> Tuple[torch.Tensor, Dict[str, float]]:
        images, labels = batch
        check_segmentation_labels(labels, self.num_classes, self.ignore_index)
        out = model(images)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        loss = F.cross_entropy(logits.float(), labels, ignore_index=self.ignore_index)
        logs = dict(ce=loss.detach())
        if aux is not None:
            aux_loss = F.cross_entropy(aux.float(), labels, ignore_index=self.ignore_index)
            logs['aux_ce'] = aux_loss.detach()
            loss = loss + self.recipe['aux_weight'] * aux_loss
        return loss, logs

    @torch.no_grad()
    def confusion(self, model, loader, ctx: StepContext) -> torch.Tensor:
        """The dataset-level confusion matrix, summed over the processes."""
        from ...dense import ConfusionMatrix
        cm = ConfusionMatrix(self.num_classes, self.ignore_index)
        for images, labels in loader:
            with ctx.autocast():
                logits = model(images.to(ctx.device))
            cm.update(logits.argmax(1).cpu(), labels)
        k = self.num_classes
        return torch.tensor(all_reduce_sum(cm.matrix.double().flatten().tolist(), ctx.info)).reshape(k, k).long()

    def evaluate(self, model, loader, ctx: StepContext) -> Dict[str, float]:
        from ...dense import miou
        result = miou(self.confusion(model, loader, ctx))
        return _percent({k: result[k] for k in ('mIoU', 'aAcc', 'mAcc')})
