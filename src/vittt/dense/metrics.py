"""Dense-prediction metrics: COCO box / mask AP through pycocotools (the reference implementation, run on COCO
json), and the dataset-level confusion-matrix mIoU of mmseg's ``IoUMetric``.

COCO AP (:func:`coco_evaluate`): pycocotools' ``COCOeval`` with its default parameters (IoU 0.50:0.05:0.95, 101
recall points, area ranges small < 32² <= medium < 96² <= large, up to 1/10/100 detections). Values of -1 are
pycocotools' "undefined": no ground truth in that area range. Mask AP is computed from results without their
``bbox`` field, so that pycocotools takes the mask area (not the box area) to assign detections to area ranges.

mIoU (:class:`ConfusionMatrix`, :func:`miou`): a [K, K] int64 matrix (rows ground truth, columns prediction)
accumulated over the whole dataset with ``torch.bincount(K * gt + pred)``, pixels labelled ``ignore_index``
skipped; per class IoU = TP / (TP + FP + FN), mIoU = the mean over classes whose union is > 0, aAcc = TP sum /
pixels, mAcc = the mean of TP / gt pixels over classes present in the ground truth. The matrix sums across
processes (``torch.distributed.all_reduce``) before :func:`miou`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ['coco_evaluate', 'detections_to_coco', 'ConfusionMatrix', 'miou', 'CocoMetrics', 'COCO_METRIC_NAMES']

PathLike = Union[str, os.PathLike]

COCO_METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')
_PYCOCOTOOLS_HINT = "pip install 'vittt[dense]' (or pip install pycocotools)"


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError(f'COCO evaluation needs pycocotools: {_PYCOCOTOOLS_HINT}') from e
    return COCO, COCOeval, mask_utils


class CocoMetrics(dict):
    """``{'bbox_AP': float, ...}`` with pycocotools' printed summary kept in ``.summary`` (a str)."""

    summary: str = ''


def _empty_results(coco_gt):
    COCO, _, _ = _pycocotools()
    res = COCO()
    res.dataset = {'images': list(coco_gt.dataset.get('images', [])),
                   'categories': copy.deepcopy(coco_gt.dataset.get('categories', [])), 'annotations': []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def coco_evaluate(gt, predictions: Union[Sequence[Mapping[str, Any]], PathLike],
                  iou_types: Sequence[str] = ('bbox', 'segm'), img_ids: Optional[Sequence[int]] = None,
                  verbose: bool = False) -> CocoMetrics:
    """COCO AP / AR of ``predictions`` against ``gt`` for each of ``iou_types`` ('bbox', 'segm').

    ``gt`` is a COCO json path or a ``pycocotools.coco.COCO``; ``predictions`` a list of COCO result dicts
    (``image_id``, ``category_id``, ``score``, ``bbox`` [x, y, w, h] and, for 'segm', ``segmentation`` as
    compressed RLE) or the path of a results json. ``img_ids`` restricts the evaluation to those images (None: all
    images of ``gt``). Returns ``{f'{iou_type}_{name}': float}`` for ``name`` in :data:`COCO_METRIC_NAMES`.

    pycocotools' prints are captured into ``.summary`` (``verbose=True`` prints them too). No predictions give 0
    (or -1 where ``gt`` has no instance in that area range), not an error. A prediction for an image that is not
    in ``gt``, or a 'segm' evaluation of results without ``segmentation``, raises ``ValueError``.
    """
    COCO, COCOeval, _ = _pycocotools()
    for t in iou_types:
        if t not in ('bbox', 'segm'):
            raise ValueError(f"iou_types must hold 'bbox' and/or 'segm', got {t!r}")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_gt = gt if isinstance(gt, COCO) else COCO(os.fspath(gt))
    if isinstance(predictions, (str, os.PathLike)):
        with open(predictions, encoding='utf-8') as f:
            predictions = json.load(f)
    predictions = list(predictions)
    known = set(coco_gt.getImgIds())
    stray = sorted({int(p['image_id']) for p in predictions} - known)
    if stray:
        raise ValueError(f'{len(stray)} predicted image id(s) are not in the ground truth, e.g. {stray[:5]}')
    eval_ids = sorted(known) if img_ids is None else sorted(int(i) for i in img_ids)
    missing = sorted(set(eval_ids) - known)
    if missing:
        raise ValueError(f'img_ids holds {len(missing)} id(s) that are not in the ground truth, e.g. {missing[:5]}')

    metrics = CocoMetrics()
    summaries = []
    for iou_type in iou_types:
        if iou_type == 'segm':
            if any('segmentation' not in p for p in predictions):
                raise ValueError("a 'segm' evaluation needs a 'segmentation' (RLE) in every prediction; evaluate "
                                 "iou_types=('bbox',) for a box-only detector")
            # without 'bbox', loadRes takes the mask area (used for the small/medium/large ranges)
            dets = [{k: v for k, v in p.items() if k != 'bbox'} for p in predictions]
        else:
            dets = [{k: v for k, v in p.items() if k != 'segmentation'} for p in predictions]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            coco_dt = coco_gt.loadRes(dets) if dets else _empty_results(coco_gt)
            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            ev.params.imgIds = eval_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for name, value in zip(COCO_METRIC_NAMES, ev.stats):
            metrics[f'{iou_type}_{name}'] = float(value)
        summaries.append(f'{iou_type}:\n' + '\n'.join(line for line in out.getvalue().splitlines()
                                                       if line.startswith(' Average')))
    metrics.summary = '\n'.join(summaries)
    if verbose:
        print(metrics.summary)
    return metrics


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco(outputs: Sequence[Mapping[str, Any]], image_ids: Sequence[Any],
                       label_to_cat_id: Union[Mapping[int, int], Sequence[int]],
                       mask_threshold: float = 0.5) -> List[Dict[str, Any]]:
    """COCO result dicts from torchvision detector outputs (one dict per image, in ``image_ids`` order).

    Each output holds ``boxes`` [N, 4] (x1, y1, x2, y2; written as [x1, y1, x2 - x1, y2 - y1]), ``scores`` [N],
    ``labels`` [N] (mapped with ``label_to_cat_id``, a dict or a sequence indexed by label) and optionally
    ``masks`` [N, 1, H, W] (or [N, H, W]) probabilities, binarised at ``>= mask_threshold`` and encoded as
    compressed RLE with str counts.
    """
    _, _, mask_utils = _pycocotools()
    if len(outputs) != len(image_ids):
        raise ValueError(f'{len(outputs)} outputs but {len(image_ids)} image ids')
    results: List[Dict[str, Any]] = []
    for out, image_id in zip(outputs, image_ids):
        image_id = int(image_id.item() if isinstance(image_id, torch.Tensor) else image_id)
        boxes = _as_numpy(out['boxes']).astype(np.float64).reshape(-1, 4)
        scores = _as_numpy(out['scores']).astype(np.float64).reshape(-1)
        labels = _as_numpy(out['labels']).astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f'image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels')
        rles = None
        if out.get('masks') is not None:
            masks = _as_numpy(out['masks'])
            if masks.ndim == 4:
                masks = masks[:, 0]
            if masks.shape[0] != len(boxes):
                raise ValueError(f'image {image_id}: {masks.shape[0]} masks for {len(boxes)} boxes')
            binary = np.asfortranarray((masks >= mask_threshold).astype(np.uint8).transpose(1, 2, 0))
            rles = mask_utils.encode(binary) if len(boxes) else []
        for k in range(len(boxes)):
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            res = {'image_id': image_id, 'category_id': int(label_to_cat_id[int(labels[k])]),
                   'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': float(scores[k])}
            if rles is not None:
                rle = rles[k]
                res['segmentation'] = {'size': [int(v) for v in rle['size']], 'counts': rle['counts'].decode('ascii')}
            results.append(res)
    return results


class ConfusionMatrix:
    """A dataset-level [K, K] confusion matrix (rows ground truth, columns prediction) for semantic segmentation.

    ``update(pred, target)`` takes predicted labels of the target's shape, or logits with one more (class)
    dimension at dim 1, which are arg-maxed. Target pixels equal to ``ignore_index`` are skipped; any other target
    or predicted label outside 0..K-1 raises ``ValueError``. ``matrix`` is int64 on the device of the first update
    (sum it across processes before :func:`miou`); ``compute()`` is ``miou(self.matrix)``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Zero the matrix (keeping its device)."""
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add the pixels of one batch; see the class docstring."""
        pred, target = torch.as_tensor(pred), torch.as_tensor(target)
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f'prediction shape {tuple(pred.shape)} does not match target shape '
                             f'{tuple(target.shape)}')
        k = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long().to(target.device)
        keep = target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=bool)
        target, pred = target[keep], pred[keep]
        if target.numel():
            if int(target.min()) < 0 or int(target.max()) >= k:
                raise ValueError(f'target label outside 0..{k - 1} (and not the ignore index {self.ignore_index}): '
                                 f'{int(target.min())}..{int(target.max())}')
            if int(pred.min()) < 0 or int(pred.max()) >= k:
                raise ValueError(f'predicted label outside 0..{k - 1}: {int(pred.min())}..{int(pred.max())}')
        counts = torch.bincount(k * target + pred, minlength=k * k).reshape(k, k)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def compute(self) -> Dict[str, Any]:
        """:func:`miou` of the matrix."""
        return miou(self.matrix)


def miou(confusion: Union[torch.Tensor, np.ndarray]) -> Dict[str, Any]:
    """mIoU, aAcc and mAcc of a [K, K] confusion matrix (rows ground truth), as mmseg's ``IoUMetric``.

    Returns ``{'mIoU': float, 'aAcc': float, 'mAcc': float, 'IoU': [K floats], 'Acc': [K floats]}``; a class
    whose union is 0 (absent from ground truth and prediction) has IoU nan and is left out of mIoU, a class absent
    from the ground truth has Acc nan and is left out of mAcc. All values are fractions in [0, 1].
    """
    cm = torch.as_tensor(confusion).detach().to('cpu', torch.float64)
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f'a confusion matrix is square [K, K], got shape {tuple(cm.shape)}')
    tp = cm.diagonal()
    gt = cm.sum(dim=1)
    union = gt + cm.sum(dim=0) - tp
    nan = torch.tensor(float('nan'), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    total = float(cm.sum())

    def nanmean(x: torch.Tensor) -> float:
        x = x[~torch.isnan(x)]
        return float(x.mean()) if x.numel() else math.nan

    return {'mIoU': nanmean(iou), 'aAcc': float(tp.sum()) / total if total else math.nan, 'mAcc': nanmean(acc),
            'IoU': [float(v) for v in iou], 'Acc': [float(v) for v in acc]}
