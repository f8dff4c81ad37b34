"""Detection and segmentation on the engine: the tasks (``task: detection`` / ``task: segmentation``), training and
evaluation of checkpoints, and the demo (``vittt dense train | eval | demo``)."""
from .task import (DETECTION_DEFAULTS, SEGMENTATION_DEFAULTS, DetectionTask, SegmentationTask, TargetError,
                   check_detection_targets, check_segmentation_labels, segmentation_collate)

__all__ = ['DetectionTask', 'SegmentationTask', 'TargetError', 'check_detection_targets', 'check_segmentation_labels',
           'segmentation_collate', 'DETECTION_DEFAULTS', 'SEGMENTATION_DEFAULTS']
