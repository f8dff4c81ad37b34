"""Dense prediction with vittt (and any timm) backbones: detection and instance segmentation on torchvision's
detectors, semantic segmentation on segmentation-models-pytorch's UPerNet, official det / seg checkpoints, COCO AP
and mIoU. The tasks that train them on the engine are in :mod:`vittt.tasks.dense`; the guide is ``docs/dense.md``.

``DenseBackbone`` (multi-scale NCHW maps at strides 4–32 from any timm model), ``SimpleFeaturePyramid`` (plain
models), ``build_maskrcnn`` / ``build_fasterrcnn`` / ``build_retinanet`` / ``build_fcos``, ``build_upernet`` (needs
the ``dense`` extra: smp), ``coco_evaluate`` / ``detections_to_coco`` (pycocotools), ``ConfusionMatrix`` / ``miou``.
"""
from .backbone import DENSE_STRIDES, DenseBackbone
from .convert import dense_backbone_state_dict, load_dense_backbone
from .detection import (DETECTORS, PRESETS, AlignedMultiScaleRoIAlign, DetectionBackbone, MmdetAnchorGenerator,
                        build_detector, build_fasterrcnn, build_fcos, build_maskrcnn, build_retinanet)
from .metrics import COCO_METRIC_NAMES, CocoMetrics, ConfusionMatrix, coco_evaluate, detections_to_coco, miou
from .pyramid import LayerNorm2d, SimpleFeaturePyramid

_LAZY = {'UPerNet', 'build_upernet', 'FCNHead'}  # need segmentation-models-pytorch


def __getattr__(name):
    if name in _LAZY:
        from . import segmentation
        return getattr(segmentation, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['DenseBackbone', 'DENSE_STRIDES', 'SimpleFeaturePyramid', 'LayerNorm2d', 'DetectionBackbone',
           'build_detector', 'build_maskrcnn', 'build_fasterrcnn', 'build_retinanet', 'build_fcos', 'DETECTORS',
           'PRESETS', 'MmdetAnchorGenerator', 'AlignedMultiScaleRoIAlign', 'UPerNet', 'build_upernet', 'FCNHead',
           'dense_backbone_state_dict', 'load_dense_backbone', 'coco_evaluate', 'detections_to_coco',
           'ConfusionMatrix', 'miou', 'CocoMetrics', 'COCO_METRIC_NAMES']
