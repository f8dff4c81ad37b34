"""Inner-model introspection (``vittt explain inner``): what the inner training does on one image, per layer and head.

For every inner model of every TTT layer (:func:`vittt.layers.record_inner_stats`): the inner loss before and after the
step(s), the norm of the inner gradient before and after ViT³'s soft normalisation ``g / (‖g‖ + 1)``, and the relative
update ``‖W − W0‖ / ‖W0‖``: the quantities the paper's insights argue about (a vanishing mixed derivative with MAE,
deep inner models that under-fit, a large inner lr that still trains).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ._common import check_model_names, eval_mode, load_images, load_model, write_json

__all__ = ['inner_introspection', 'plot_inner', 'run_inner', 'STATS']

#: the recorded quantities, in plotting order
STATS = ('loss_before', 'loss_after', 'grad_norm', 'grad_norm_normalized', 'update')


def _describe(name: str, module: nn.Module) -> str:
    fn = module.fn.name
    heads = getattr(module, 'num_heads', 1)
    return f'{fn} ×{heads}' if fn != 'dwconv3x3' else f'{fn} ({module.width} ch)'


def inner_introspection(model: nn.Module, image: torch.Tensor) -> Dict[str, Any]:
    """Run ``model`` on one image ``[C, H, W]`` (eval mode, no grad) and return, per inner model (module name, in
    forward order), ``kind`` and each of :data:`STATS` as a per-head list (one value for a map-wide inner model)."""
    from ...layers import TokenInner, record_inner_stats

    if not any(isinstance(m, TokenInner) for m in model.modules()):
        raise ValueError(f'{type(model).__name__} has no inner model built on vittt.ops.inner (ViT³, H-ViT³, DiT³ and '
                         f'vit3_design_small have them), so there is nothing to introspect')
    modules = dict(model.named_modules())
    with torch.no_grad(), eval_mode(model), record_inner_stats(model) as stats:
        logits = model(image.unsqueeze(0))
    layers = {}
    for name, calls in stats.items():
        if not calls:
            continue
        record = calls[0]
        layers[name] = dict(kind=_describe(name, modules[name]),
                            **{key: [float(v) for v in record[key][0]] for key in STATS})
    return dict(layers=layers, logits=logits[0].tolist() if logits.ndim == 2 else None)


def _mean(values: List[float]) -> float:
    return sum(values) / len(values)


def plot_inner(result: Dict[str, Any], path, title: Optional[str] = None) -> Path:
    """Four panels over the layers (one line per kind of inner model, heads as dots): the inner loss before / after the
    step, the gradient norm before / after normalisation (log scale) and the relative update; a PNG written
    atomically."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from ...engine.plots import save_figure

    layers = result['layers']
    kinds: Dict[str, List[str]] = {}
    for name, row in layers.items():
        kinds.setdefault(row['kind'].split(' ')[0], []).append(name)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), layout='constrained')
    panels = [('inner loss', [('loss_before', 'before', '-'), ('loss_after', 'after', '--')], False),
              ('‖inner gradient‖', [('grad_norm', 'raw', '-'), ('grad_norm_normalized', 'normalised', '--')], True),
              ('‖W − W0‖ / ‖W0‖', [('update', 'update', '-')], True),
              ('loss after − before', [], False)]
    for ax, (label, series, log) in zip(axes, panels):
        for kind, names in kinds.items():
            x = list(range(len(names)))
            if series:
                for key, what, style in series:
                    values = [layers[n][key] for n in names]
                    line, = ax.plot(x, [_mean(v) for v in values], style, marker='o', ms=3, label=f'{kind}: {what}')
                    for i, v in enumerate(values):
                        ax.scatter([i] * len(v), v, s=6, color=line.get_color(), alpha=0.35)
            else:
                diffs = [[a - b for a, b in zip(layers[n]['loss_after'], layers[n]['loss_before'])] for n in names]
                ax.plot(x, [_mean(d) for d in diffs], marker='o', ms=3, label=kind)
                ax.axhline(0.0, color='0.6', lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel('TTT layer')
        if log:
            ax.set_yscale('log')
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title or 'Inner training per layer (lines: mean over heads; dots: heads)', fontsize=10)
    return save_figure(fig, path, bbox_inches='tight')


def run_inner(model_name: str, output='results/explain/inner', data: str = 'fashion-mnist', image: int = 0,
              img_size: Optional[int] = None, checkpoint=None, seed: int = 0,
              model_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What ``vittt explain inner`` does: image number ``image`` of ``data`` (as the other explain tools draw them,
    with ``seed``) through ``model_name`` (weights from ``checkpoint``, else random; ``model_kwargs`` e.g. design
    switches for a model without checkpoint); writes ``<output>/inner.png`` and ``inner.json``; returns the payload."""
    check_model_names([model_name])
    if checkpoint is not None and model_kwargs:
        raise ValueError('switches (model kwargs) apply to a freshly built model, not to a checkpoint: the '
                         'checkpoint holds its own architecture')
    model, in_chans, size = load_model(model_name, checkpoint, img_size, model_kwargs=model_kwargs)
    images = load_images(data, image + 1, size, in_chans, seed)[0]
    start = time.perf_counter()
    result = inner_introspection(model, images[image])
    output = Path(output)
    payload = dict(model=model_name, checkpoint=None if checkpoint is None else str(checkpoint), data=str(data),
                   image=image, img_size=size, seed=seed, seconds=round(time.perf_counter() - start, 2), **result)
    weights = 'random weights' if checkpoint is None else Path(str(checkpoint)).name
    payload['png'] = str(plot_inner(result, output / 'inner.png',
                                    title=f'{model_name} ({weights}) on {data} image {image} at {size}²: '
                                          f'inner training per layer (lines: mean over heads; dots: heads)'))
    payload['json'] = str(write_json(output / 'inner.json', payload))
    return payload
