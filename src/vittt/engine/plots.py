"""Loss and metric curves of one or several runs (matplotlib, headless), against epoch or update."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

__all__ = ['plot_runs', 'save_figure']

_METRIC_LABELS = {'top1': 'top-1 (%)'}


def _x(history):
    """Rows of epoch-based runs carry their epoch, rows of step-based runs only their update count (``step``)."""
    key = 'epoch' if all('epoch' in r for r in history) else 'step'
    return key, [r[key] for r in history]


def save_figure(fig, path, dpi: int = 110, **savefig_kwargs) -> Path:
    """Write a matplotlib figure as PNG atomically (a temporary file renamed over ``path``: never half-written) and
    close it; returns the path."""
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=dpi, **savefig_kwargs))
    finally:
        plt.close(fig)
    return path


def plot_runs(runs: Dict[str, Sequence[Dict]], path, title: Optional[str] = None,
              metric: Optional[str] = 'top1') -> Path:
    """One figure, two panels (loss; ``metric`` and its EMA twin) with a line per run; written atomically as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    xlabel = 'epoch'
    for index, (name, history) in enumerate(runs.items()):
        if not history:
            continue
        xkey, xs = _x(history)
        xlabel = xkey
        color = f'C{index % 10}'  # one colour per run: solid = train / metric, dashed = val, dotted = EMA
        prefix = f'{name} ' if len(runs) > 1 else ''
        ax_loss.plot(xs, [r['train_loss'] for r in history], marker='o', color=color, label=f'{prefix}train')
        val = [(r[xkey], r['val_loss']) for r in history if 'val_loss' in r]
        if val:
            ax_loss.plot(*zip(*val), marker='s', linestyle='--', color=color, label=f'{prefix}val')
        if metric:
            points = [(r[xkey], r[metric]) for r in history if metric in r]
            if points:
                ax_metric.plot(*zip(*points), marker='o', color=color, label=f'{prefix}{metric}')
            ema = [(r[xkey], r[f'ema_{metric}']) for r in history if f'ema_{metric}' in r]
            if ema:
                ax_metric.plot(*zip(*ema), marker='^', linestyle=':', color=color, label=f'{prefix}EMA {metric}')
    ax_loss.set(xlabel=xlabel, ylabel='loss', title='loss')
    ax_metric.set(xlabel=xlabel, ylabel=_METRIC_LABELS.get(metric, metric or ''), title='validation')
    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
