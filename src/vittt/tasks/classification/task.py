"""Image classification on the engine: Mixup / CutMix, the criterion, MESA, top-k evaluation."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...engine import StepContext, Task, all_reduce_sum, register_task

__all__ = ['ClassificationTask', 'CLASSIFICATION_DEFAULTS', 'build_model', 'topk_metrics']

# The official ViT³ code's values (spec A.5): Mixup 0.8 / CutMix 1.0, label smoothing 0.1, RandAugment m9, colour
# jitter 0.4, random erasing 0.25, bicubic, eval crop 224/256; drop-path and MESA per model (configs/).
CLASSIFICATION_DEFAULTS: Dict[str, Any] = dict(
    img_size=224, in_chans=3,
    label_smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode='batch',
    auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.4, reprob=0.25, remode='pixel', recount=1,
    interpolation='bicubic', crop_pct=0.875, scale=[0.08, 1.0], hflip=0.5,
    drop_path=0.0, drop=0.0,
    mesa=0.0, mesa_start=0.25,
)


def build_model(recipe: Dict[str, Any], num_classes: int) -> nn.Module:
    """``timm.create_model`` with the recipe's regularisation; any registered model (ours or timm's)."""
    import timm

    kwargs = dict(num_classes=num_classes, drop_path_rate=recipe['drop_path'], drop_rate=recipe['drop'],
                  in_chans=recipe['in_chans'])
    kwargs.update(recipe.get('model_kwargs') or {})  # explicit model arguments win
    try:
        return timm.create_model(recipe['model'], img_size=recipe['img_size'], **kwargs)
    except TypeError as e:  # models without an img_size argument (convnets)
        if 'img_size' not in str(e):
            raise
        return timm.create_model(recipe['model'], **kwargs)


def topk_metrics(logits: torch.Tensor, targets: torch.Tensor) -> Tuple[float, float, float, int]:
    """(summed cross-entropy, top-1 hits, top-5 hits, count) of one batch."""
    logits = logits.float()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return (F.cross_entropy(logits, targets, reduction='sum').item(), hits[:, 0].sum().item(),
            hits.any(dim=1).sum().item(), len(targets))


@register_task
class ClassificationTask(Task):
    """``recipe`` + the number of classes. Logs ``train_loss``; evaluates ``val_loss``, ``top1``, ``top5`` (%);
    ``best.pth`` by top-1. ``model_factory(num_classes)`` builds a model that is not a timm name (default:
    ``timm.create_model(recipe['model'], ...)`` with the recipe's regularisation)."""
    name = 'classification'
    produces = 'an image classifier'
    defaults = CLASSIFICATION_DEFAULTS
    best_metric, best_mode = 'top1', 'max'
    resume_keys = ('img_size',)

    def __init__(self, recipe: Dict[str, Any], num_classes: int, model_factory=None):
        super().__init__(recipe)
        self.model_factory = model_factory
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.num_classes = num_classes
        mixing = recipe['mixup'] > 0 or recipe['cutmix'] > 0
        self.mixup = Mixup(mixup_alpha=recipe['mixup'], cutmix_alpha=recipe['cutmix'], prob=recipe['mixup_prob'],
                           switch_prob=recipe['mixup_switch_prob'], mode=recipe['mixup_mode'],
                           label_smoothing=recipe['label_smoothing'], num_classes=num_classes) if mixing else None
        if mixing:
            self.criterion = SoftTargetCrossEntropy()
        elif recipe['label_smoothing'] > 0:
            self.criterion = LabelSmoothingCrossEntropy(recipe['label_smoothing'])
        else:
            self.criterion = nn.CrossEntropyLoss()

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any], img_size: Optional[int] = None) -> 'ClassificationTask':
        """For evaluation: the checkpoint's recipe with dropout and drop-path off (``img_size``: another size)."""
        recipe = {**CLASSIFICATION_DEFAULTS, **ckpt['recipe'], 'drop_path': 0.0, 'drop': 0.0}
        recipe['img_size'] = img_size or recipe['img_size']
        return cls(recipe, ckpt['identity']['num_classes'])

    def build_model(self) -> nn.Module:
        if self.model_factory is not None:
            return self.model_factory(self.num_classes)
        return build_model(self.recipe, self.num_classes)

    def identity(self) -> Dict[str, Any]:
        return dict(model_name=self.recipe['model'], num_classes=self.num_classes)

    def uses_ema(self) -> bool:
        return self.recipe['mesa'] > 0  # MESA's teacher is the EMA model

    def _mesa_active(self, ctx: StepContext) -> bool:
        recipe = self.recipe
        if ctx.ema is None or recipe['mesa'] <= 0:
            return False
        if recipe.get('steps') is not None:
            return ctx.step >= recipe['mesa_start'] * recipe['steps']
        return ctx.epoch >= recipe['mesa_start'] * recipe['epochs']

    def train_step(self, model, batch, ctx: StepContext):
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        logits = model(images)
        loss = self.criterion(logits.float(), targets)
        if self._mesa_active(ctx):  # loss + r · CE(out, softmax(EMA(x)))
            with torch.no_grad():
                teacher = ctx.ema(images).float().softmax(dim=-1)
            loss = loss + self.recipe['mesa'] * torch.sum(-teacher * F.log_softmax(logits.float(), dim=-1),
                                                          dim=-1).mean()
        return loss, {}

    def evaluate(self, model, loader, ctx: StepContext) -> Dict[str, float]:
        metrics = evaluate(model, loader, ctx.info, ctx.autocast)
        metrics.pop('count')
        return metrics


def evaluate(model: nn.Module, loader, info, autocast=None) -> Dict[str, float]:
    """``val_loss`` (mean cross-entropy), ``top1`` / ``top5`` (%) and ``count`` over the loader, summed across
    processes."""
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        for images, targets in loader:
            images, targets = images.to(info.device), targets.to(info.device)
            with (autocast() if autocast else torch.autocast(info.device.type, enabled=False)):
                logits = model(images)
            totals = [a + b for a, b in zip(totals, topk_metrics(logits, targets))]
    loss, top1, top5, count = all_reduce_sum(totals, info)
    if count == 0:
        raise ValueError('the evaluation set is empty')
    return dict(val_loss=loss / count, top1=100 * top1 / count, top5=100 * top5 / count, count=int(count))
