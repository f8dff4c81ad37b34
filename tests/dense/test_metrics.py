"""vittt.dense.metrics: COCO AP through pycocotools (ground truth as predictions, a hand-computed AP, empty and
restricted evaluations), detector outputs to COCO results, and the confusion-matrix mIoU."""
import json
import math

import numpy as np
import pytest
import torch

from vittt.data import CocoInstances
from vittt.dense import ConfusionMatrix, coco_evaluate, detections_to_coco, miou

mask_utils = pytest.importorskip('pycocotools.mask')
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

KEYS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100')


def gt_as_predictions(ann_file, image_ids=None):
    with open(ann_file) as f:
        data = json.load(f)
    return [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'], 'score': 1.0,
             'segmentation': a['segmentation']}
            for a in data['annotations'] if image_ids is None or a['image_id'] in image_ids]


def test_ground_truth_as_predictions(tiny_dense, tmp_path):
    ann = tiny_dense / 'annotations/instances_val.json'
    metrics = coco_evaluate(ann, gt_as_predictions(ann))
    for t in ('bbox', 'segm'):
        assert all(f'{t}_{k}' in metrics for k in KEYS)
        assert metrics[f'{t}_AP'] == 1.0 and metrics[f'{t}_AP50'] == 1.0 and metrics[f'{t}_AR100'] == 1.0
    assert 'Average Precision' in metrics.summary and 'segm' in metrics.summary
    # a results json path and a COCO object give the same; so does the reader -> detector output route
    results = tmp_path / 'results.json'
    results.write_text(json.dumps(gt_as_predictions(ann)))
    ds = CocoInstances(tiny_dense, 'val')
    assert coco_evaluate(ds.coco, str(results)) == metrics
    outputs, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        outputs.append({'boxes': t['boxes'], 'labels': t['labels'], 'scores': torch.ones(len(t['labels'])),
                        'masks': t['masks'][:, None].float()})
        ids.append(t['image_id'])
    dets = detections_to_coco(outputs, ids, ds.label_to_cat_id)
    via_reader = coco_evaluate(ds.coco, dets)
    assert via_reader['bbox_AP'] == 1.0 and via_reader['segm_AP'] == 1.0


def test_restricted_and_empty(tiny_dense):
    ann = tiny_dense / 'annotations/instances_val.json'
    some = [1, 2, 3]
    part = gt_as_predictions(ann, set(some))
    assert coco_evaluate(ann, part, iou_types=('bbox',), img_ids=some)['bbox_AP'] == 1.0
    assert coco_evaluate(ann, gt_as_predictions(ann), iou_types=('segm',), img_ids=some)['segm_AP'] == 1.0
    everything = coco_evaluate(ann, part, iou_types=('bbox',))
    assert set(everything) == {f'bbox_{k}' for k in KEYS + ('ARs', 'ARm', 'ARl')}
    assert 0 < everything['bbox_AR100'] < 1  # the other images' objects are missed
    empty = coco_evaluate(ann, [])
    assert all(v in (0.0, -1.0) for v in empty.values()) and empty['bbox_AP'] == 0.0 and empty['segm_AR100'] == 0.0
    with pytest.raises(ValueError, match='not in the ground truth'):
        coco_evaluate(ann, [dict(part[0], image_id=999)])
    with pytest.raises(ValueError, match="'segmentation'"):
        coco_evaluate(ann, [{k: v for k, v in p.items() if k != 'segmentation'} for p in part])


def test_hand_computed_ap(tmp_path):
    """Two objects on image 1, none on image 2. Detections by score: a TP (IoU 1), a FP on image 2, a box with IoU
    0.67 on the second object. COCO AP: the precision envelope sampled at the 101 recall points 0, 0.01, ..., 1."""
    gt = {'images': [{'id': 1, 'width': 100, 'height': 100, 'file_name': 'a.png'},
                     {'id': 2, 'width': 100, 'height': 100, 'file_name': 'b.png'}],
          'categories': [{'id': 1, 'name': 'thing'}],
          'annotations': [{'id': 1, 'image_id': 1, 'category_id': 1, 'bbox': [40, 40, 20, 20], 'area': 400,
                           'iscrowd': 0},
                          {'id': 2, 'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 20, 20], 'area': 400,
                           'iscrowd': 0}]}
    path = tmp_path / 'gt.json'
    path.write_text(json.dumps(gt))
    dets = [{'image_id': 1, 'category_id': 1, 'bbox': [40, 40, 20, 20], 'score': 0.9},
            {'image_id': 2, 'category_id': 1, 'bbox': [10, 10, 20, 20], 'score': 0.8},
            {'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 20, 13.4], 'score': 0.7}]  # IoU 268 / 400 = 0.67
    m = coco_evaluate(path, dets, iou_types=('bbox',))
    # IoU thresholds 0.50..0.65 (4 of 10) accept the third box: TP, FP, TP -> precision 1, 1/2, 2/3 at recall
    # 1/2, 1/2, 1; the envelope is 1 up to recall 0.5 (51 points: 0.00..0.50) and 2/3 above (50 points)
    matched = (51 * 1.0 + 50 * 2 / 3) / 101
    # thresholds 0.70..0.95 (6 of 10): TP, FP, FP -> recall stops at 1/2: 51 points of precision 1, 50 of 0
    unmatched = 51 / 101
    assert m['bbox_AP50'] == pytest.approx(matched, abs=1e-12)
    assert m['bbox_AP75'] == pytest.approx(unmatched, abs=1e-12)
    assert m['bbox_AP'] == pytest.approx((4 * matched + 6 * unmatched) / 10, abs=1e-12)
    assert m['bbox_APs'] == pytest.approx(m['bbox_AP']) and m['bbox_APm'] == -1 and m['bbox_APl'] == -1
    assert m['bbox_AR1'] == pytest.approx(0.5)  # one detection per image: only the first object
    assert m['bbox_AR100'] == pytest.approx((4 * 1.0 + 6 * 0.5) / 10)


def test_detections_to_coco_round_trip():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 1, 17, 23, generator=g)
    boxes = torch.tensor([[1.5, 2.0, 10.0, 12.25], [0.0, 0.0, 23.0, 17.0], [5.0, 6.0, 7.0, 9.0]])
    out = {'boxes': boxes, 'scores': torch.tensor([0.9, 0.5, 0.1]), 'labels': torch.tensor([1, 2, 1]),
           'masks': probs}
    empty = {'boxes': torch.zeros(0, 4), 'scores': torch.zeros(0), 'labels': torch.zeros(0, dtype=torch.int64),
             'masks': torch.zeros(0, 1, 17, 23)}
    res = detections_to_coco([out, empty], [torch.tensor(4), 8], {1: 5, 2: 9})
    assert len(res) == 3 and all(r['image_id'] == 4 for r in res)
    assert [r['category_id'] for r in res] == [5, 9, 5] and [r['score'] for r in res] == pytest.approx([.9, .5, .1])
    assert res[0]['bbox'] == [1.5, 2.0, 8.5, 10.25]
    for k, r in enumerate(res):
        assert isinstance(r['segmentation']['counts'], str) and r['segmentation']['size'] == [17, 23]
        assert np.array_equal(mask_utils.decode(r['segmentation']), (probs[k, 0] >= 0.5).numpy().astype(np.uint8))
    by_list = detections_to_coco([out], [4], [0, 5, 9], mask_threshold=0.8)
    assert [r['category_id'] for r in by_list] == [5, 9, 5]
    assert np.array_equal(mask_utils.decode(by_list[1]['segmentation']), (probs[1, 0] >= 0.8).numpy())
    no_masks = detections_to_coco([{k: v for k, v in out.items() if k != 'masks'}], [4], {1: 5, 2: 9})
    assert all('segmentation' not in r for r in no_masks)


def test_miou_hand_computed():
    target = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 255, 255]])
    pred = torch.tensor([[0, 0, 1, 1, 2, 2, 0, 3, 1]])  # the class-3 prediction is on an ignored pixel
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    r = cm.compute()
    # IoU = TP / (gt + pred - TP): class 0 2/(3+3-2), class 1 1/(2+2-1), class 2 1/(2+2-1); class 3 absent
    assert r['IoU'][:3] == pytest.approx([0.5, 1 / 3, 1 / 3]) and math.isnan(r['IoU'][3])
    assert r['mIoU'] == pytest.approx((0.5 + 2 / 3) / 3)
    assert r['aAcc'] == pytest.approx(4 / 7) and r['mAcc'] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    # logits (one more dimension) are arg-maxed; updates accumulate
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 2, 1).float()
    cm.update(logits, target)
    assert cm.matrix.tolist() == [[4, 2, 0, 0], [0, 2, 2, 0], [2, 0, 2, 0], [0, 0, 0, 0]]
    assert miou(cm.matrix)['mIoU'] == pytest.approx(r['mIoU'])
    # a class predicted but absent from the ground truth counts (IoU 0); one absent from both does not
    r2 = miou(torch.tensor([[3, 1, 0], [0, 0, 0], [0, 0, 0]]))
    assert r2['IoU'][:2] == [0.75, 0.0] and math.isnan(r2['IoU'][2]) and r2['mIoU'] == pytest.approx(0.375)
    assert math.isnan(r2['Acc'][1]) and r2['mAcc'] == pytest.approx(0.75)
    cm.reset()
    assert int(cm.matrix.sum()) == 0
    with pytest.raises(ValueError, match='target label'):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match='predicted label'):
        cm.update(torch.tensor([0, 7]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match='shape'):
        cm.update(torch.zeros(2, 3), torch.zeros(3, 2))


def test_miou_matches_torchmetrics():
    classification = pytest.importorskip('torchmetrics.classification')
    g = torch.Generator().manual_seed(0)
    k = 5
    target = torch.randint(0, k, (3, 16, 16), generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target,
                       torch.randint(0, k, target.shape, generator=g))
    target[:, :2] = 255
    cm = ConfusionMatrix(k)
    for b in range(3):
        cm.update(pred[b:b + 1], target[b:b + 1])
    assert (cm.matrix.sum(0) > 0).all() and (cm.matrix.sum(1) > 0).all()  # every class appears
    ref = classification.MulticlassJaccardIndex(num_classes=k, average='macro', ignore_index=255)
    ref.update(pred, target)
    assert cm.compute()['mIoU'] == pytest.approx(float(ref.compute()), abs=1e-6)
