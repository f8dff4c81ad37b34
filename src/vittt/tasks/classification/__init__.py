"""Image classification: Mixup / CutMix, label smoothing, MESA, top-k evaluation, evaluation of official or
converted weights, and the Fashion-MNIST demo."""
from .run import evaluate_checkpoint, train
from .task import CLASSIFICATION_DEFAULTS, ClassificationTask, build_model, evaluate, topk_metrics

__all__ = ['ClassificationTask', 'CLASSIFICATION_DEFAULTS', 'build_model', 'evaluate', 'topk_metrics', 'train',
           'evaluate_checkpoint']
