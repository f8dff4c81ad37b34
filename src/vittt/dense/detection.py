"""Detection and instance segmentation with torchvision's detectors over a :class:`~vittt.dense.DenseBackbone`.

``build_maskrcnn`` / ``build_fasterrcnn`` / ``build_retinanet`` / ``build_fcos`` return the torchvision models
(``torchvision.models.detection``), so their training losses, post-processing, targets and outputs are torchvision's
own: images are lists of ``[3, H, W]`` tensors in [0, 1]; targets dicts with ``boxes`` (xyxy, pixels), ``labels``
(1..num_classes, 0 is background) and, for Mask R-CNN, ``masks`` ``[N, H, W]``.

``num_classes`` counts the object classes (80 for COCO): torchvision's background class is added here.

Presets:

* ``'official'``: the settings of the official Mask R-CNN 1× configs (mmdet ``mask-rcnn_r50_fpn``; spec
  dense.md §2.4): FPN 256 on strides 4–32 plus a stride-64 max-pool level, anchors 32–512 × ratios 0.5 / 1 / 2,
  the shorter side drawn from 480–800 (step 32) in training and 800 at test, longer side ≤ 1333, RPN 2000 → 1000
  proposals in training and 1000 / 1000 at test (NMS 0.7), RoI sampler 512 at 0.25 positives, TwoMLP 1024 box
  head, 4 × conv256 mask head, test score 0.05, NMS 0.5, 100 detections.
* ``'cpu-small'``: the CPU demo (spec §8.1): FPN 64, anchors 16–256, no resizing of 192² canvases
  (``image_size``), RPN 600 → 300 (train) / 300 → 100 (test), 128 RoIs per image, TwoMLP 256 box head,
  2 × conv64 mask head, 50 detections.

``mmdet_compat=True`` switches two torchvision choices to mmdet's, for closer inference with converted official
checkpoints: unrounded base anchors and ``aligned=True`` adaptive-sampling RoIAlign (mmcv's defaults).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from .backbone import DenseBackbone

__all__ = ['DetectionBackbone', 'build_maskrcnn', 'build_fasterrcnn', 'build_retinanet', 'build_fcos',
           'build_detector', 'DETECTORS', 'PRESETS', 'MmdetAnchorGenerator', 'AlignedMultiScaleRoIAlign']

DETECTORS = ('maskrcnn', 'fasterrcnn', 'retinanet', 'fcos')

PRESETS: Dict[str, Dict[str, Any]] = {
    'official': dict(fpn_channels=256, anchor_sizes=(32, 64, 128, 256, 512), min_size=tuple(range(480, 801, 32)),
                     max_size=1333,
                     rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000,
                     rpn_post_nms_top_n_test=1000, box_batch_size_per_image=512, box_positive_fraction=0.25,
                     box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100, representation=1024,
                     mask_layers=(256, 256, 256, 256)),
    'cpu-small': dict(fpn_channels=64, anchor_sizes=(16, 32, 64, 128, 256), min_size=192, max_size=192,
                      rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
                      rpn_post_nms_top_n_test=100, box_batch_size_per_image=128, box_positive_fraction=0.25,
                      box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=50, representation=256,
                      mask_layers=(64, 64)),
}


class DetectionBackbone(nn.Module):
    """``DenseBackbone`` + FPN as torchvision detectors want it: ``forward(images)`` -> ``OrderedDict`` of maps with
    ``out_channels`` channels each.

    ``levels``: the backbone strides the FPN takes (4–32 for the R-CNNs, 8–32 for RetinaNet / FCOS). ``extra``:
    ``'pool'`` adds a stride-2 max-pool of the last level (Mask R-CNN's P6), ``'p6p7'`` RetinaNet's two stride-2
    convolutions. A plain backbone whose simple feature pyramid already ends in ``out_channels``-wide maps (ViTDet's
    output convs) skips the FPN.
    """

    def __init__(self, backbone: DenseBackbone, out_channels: int = 256, levels: Sequence[int] = (4, 8, 16, 32),
                 extra: Optional[str] = 'pool'):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

        missing = [s for s in levels if s not in backbone.strides]
        if missing:
            raise ValueError(f'the backbone has strides {backbone.strides}, the detector needs {list(levels)}')
        self.body = backbone
        self.take = [backbone.strides.index(s) for s in levels]
        self.out_channels = out_channels
        extra_block = {'pool': LastLevelMaxPool, 'p6p7': lambda: LastLevelP6P7(out_channels, out_channels),
                       None: lambda: None}[extra]()
        in_chs = [backbone.out_channels[i] for i in self.take]
        if backbone.pyramid is not None and all(c == out_channels for c in in_chs) and extra != 'p6p7':
            self.fpn = None  # ViTDet: the simple pyramid's output convs are the neck
            self.extra = extra_block
        else:
            self.fpn = FeaturePyramidNetwork(in_chs, out_channels, extra_blocks=extra_block)
            self.extra = None

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        maps = OrderedDict((str(k), features[i]) for k, i in enumerate(self.take))
        if self.fpn is not None:
            return self.fpn(maps)
        if self.extra is not None:
            names = list(maps)
            results, names = self.extra(list(maps.values()), list(maps.values()), names)
            maps = OrderedDict(zip(names, results))
        return maps


class MmdetAnchorGenerator(AnchorGenerator):
    """torchvision's ``AnchorGenerator`` with base anchors not rounded to integers (mmdet's)."""

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same level mapping) with ``aligned=True`` (mmcv's RoIAlign); mmdet uses
    adaptive sampling (``sampling_ratio=0``)."""

    def forward(self, x, boxes, image_shapes):
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        out = features[0].new_zeros((len(rois), features[0].shape[1]) + tuple(self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            out[idx] = roi_align(feature, rois[idx], self.output_size, scale, self.sampling_ratio,
                                 aligned=True).to(out.dtype)
        return out


def _as_backbone(backbone: Union[str, DenseBackbone, nn.Module], detector: str, fpn_channels: int,
                 backbone_kwargs: Dict[str, Any]) -> DenseBackbone:
    if isinstance(backbone, DenseBackbone):
        return backbone
    if isinstance(backbone, str):
        kwargs = dict(backbone_kwargs)
        if detector in ('maskrcnn', 'fasterrcnn'):
            kwargs.setdefault('pyramid_chs', fpn_channels)  # plain models: ViTDet's pyramid with its output convs
        else:
            kwargs.setdefault('strides', (8, 16, 32))  # P3-P5 (+ P6 / P7 from the neck)
        import timm
        if not timm.is_model(backbone):
            raise ValueError(f'unknown backbone {backbone!r}: not a registered timm model')
        return DenseBackbone(backbone, **kwargs)
    return DenseBackbone(backbone, **backbone_kwargs)


def build_detector(detector: str, backbone: Union[str, DenseBackbone, nn.Module], num_classes: int,
                   preset: str = 'official', mmdet_compat: bool = False, image_size: Optional[int] = None,
                   backbone_kwargs: Optional[Dict[str, Any]] = None, **tv_kwargs) -> nn.Module:
    """A torchvision ``detector`` (one of :data:`DETECTORS`) over ``backbone`` (a model name, a built timm model or a
    :class:`DenseBackbone`) with ``preset``'s settings; ``image_size`` overrides the preset's min / max size (the
    detector then never resizes images of that size); ``tv_kwargs`` go to the torchvision constructor last."""
    from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    if detector not in DETECTORS:
        raise ValueError(f'detector must be one of {DETECTORS}, got {detector!r}')
    if preset not in PRESETS:
        raise ValueError(f'preset must be one of {sorted(PRESETS)}, got {preset!r}')
    if num_classes < 1:
        raise ValueError(f'num_classes counts the object classes (without background) and must be >= 1, '
                         f'got {num_classes}')
    cfg = PRESETS[preset]
    if image_size is not None:
        cfg = dict(cfg, min_size=image_size, max_size=image_size)
    fpn = cfg['fpn_channels']
    dense = _as_backbone(backbone, detector, fpn, backbone_kwargs or {})
    anchor_cls = MmdetAnchorGenerator if mmdet_compat else AnchorGenerator
    common = dict(min_size=cfg['min_size'], max_size=cfg['max_size'])
    if detector in ('maskrcnn', 'fasterrcnn'):
        body = DetectionBackbone(dense, fpn, levels=(4, 8, 16, 32), extra='pool')
        anchors = anchor_cls(tuple((s,) for s in cfg['anchor_sizes']), ((0.5, 1.0, 2.0),) * len(cfg['anchor_sizes']))
        names = ['0', '1', '2', '3']
        if mmdet_compat:
            box_pool, mask_pool = AlignedMultiScaleRoIAlign(names, 7, 0), AlignedMultiScaleRoIAlign(names, 14, 0)
        else:
            box_pool, mask_pool = MultiScaleRoIAlign(names, 7, 2), MultiScaleRoIAlign(names, 14, 2)
        rep = cfg['representation']
        kwargs = dict(common, rpn_anchor_generator=anchors, box_roi_pool=box_pool,
                      box_head=TwoMLPHead(fpn * 7 * 7, rep), box_predictor=FastRCNNPredictor(rep, num_classes + 1),
                      num_classes=None,
                      **{k: cfg[k] for k in ('rpn_pre_nms_top_n_train', 'rpn_post_nms_top_n_train',
                                             'rpn_pre_nms_top_n_test', 'rpn_post_nms_top_n_test',
                                             'box_batch_size_per_image', 'box_positive_fraction', 'box_score_thresh',
                                             'box_nms_thresh', 'box_detections_per_img')})
        if mmdet_compat:
            kwargs['rpn_score_thresh'] = 0.0
        if detector == 'maskrcnn':
            layers = tuple(cfg['mask_layers'])
            kwargs.update(mask_roi_pool=mask_pool, mask_head=MaskRCNNHeads(fpn, layers, 1),
                          mask_predictor=MaskRCNNPredictor(layers[-1], layers[-1], num_classes + 1))
            return MaskRCNN(body, **dict(kwargs, **tv_kwargs))
        return FasterRCNN(body, **dict(kwargs, **tv_kwargs))
    # single-stage detectors: P3-P7 (P6 / P7 by stride-2 convolutions), as torchvision's resnet50 versions
    body = DetectionBackbone(dense, fpn, levels=(8, 16, 32), extra='p6p7')
    sizes = cfg['anchor_sizes']
    kwargs = dict(common, score_thresh=cfg['box_score_thresh'], nms_thresh=cfg['box_nms_thresh'],
                  detections_per_img=cfg['box_detections_per_img'])
    # (the classification heads are sigmoid: label 0 is never a target, so index 0 stays unused as in torchvision)
    if detector == 'retinanet':  # three octave scales per level, from the preset's sizes at P3-P7
        octave = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
        anchors = anchor_cls(tuple(tuple(s * o for o in octave) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
        return RetinaNet(body, num_classes + 1, anchor_generator=anchors, **dict(kwargs, **tv_kwargs))
    strides = (8, 16, 32, 64, 128)  # FCOS: one anchor point per location, sized by its level's stride
    anchors = anchor_cls(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    return FCOS(body, num_classes + 1, anchor_generator=anchors, **dict(kwargs, **tv_kwargs))


def build_maskrcnn(backbone, num_classes: int, preset: str = 'official', mmdet_compat: bool = False, **kwargs):
    """torchvision ``MaskRCNN`` over ``backbone``; see :func:`build_detector`."""
    return build_detector('maskrcnn', backbone, num_classes, preset, mmdet_compat, **kwargs)


def build_fasterrcnn(backbone, num_classes: int, preset: str = 'official', mmdet_compat: bool = False, **kwargs):
    """torchvision ``FasterRCNN`` over ``backbone``; see :func:`build_detector`."""
    return build_detector('fasterrcnn', backbone, num_classes, preset, mmdet_compat, **kwargs)


def build_retinanet(backbone, num_classes: int, preset: str = 'official', mmdet_compat: bool = False, **kwargs):
    """torchvision ``RetinaNet`` over ``backbone`` (P3–P7); see :func:`build_detector`."""
    return build_detector('retinanet', backbone, num_classes, preset, mmdet_compat, **kwargs)


def build_fcos(backbone, num_classes: int, preset: str = 'official', mmdet_compat: bool = False, **kwargs):
    """torchvision ``FCOS`` over ``backbone`` (P3–P7); see :func:`build_detector`."""
    return build_detector('fcos', backbone, num_classes, preset, mmdet_compat, **kwargs)
