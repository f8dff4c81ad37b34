"""Loss and accuracy curves of a run (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ['plot_curves', 'plot_runs']


def plot_runs(runs: Dict[str, Sequence[Dict]], path, title: Optional[str] = None) -> Path:
    """One figure, two panels (loss; top-1) with a line per run and metric; written atomically as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, history in runs.items():
        epochs = [r['epoch'] for r in history]
        prefix = f'{name} ' if len(runs) > 1 else ''
        ax_loss.plot(epochs, [r['train_loss'] for r in history], marker='o', label=f'{prefix}train')
        val = [(r['epoch'], r['val_loss']) for r in history if 'val_loss' in r]
        if val:
            ax_loss.plot(*zip(*val), marker='s', linestyle='--', label=f'{prefix}val')
        acc = [(r['epoch'], r['top1']) for r in history if 'top1' in r]
        if acc:
            ax_acc.plot(*zip(*acc), marker='o', label=f'{prefix}top-1')
        ema = [(r['epoch'], r['ema_top1']) for r in history if 'ema_top1' in r]
        if ema:
            ax_acc.plot(*zip(*ema), marker='^', linestyle=':', label=f'{prefix}EMA top-1')
    ax_loss.set(xlabel='epoch', ylabel='loss', title='loss')
    ax_acc.set(xlabel='epoch', ylabel='top-1 (%)', title='validation accuracy')
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format='png', dpi=110))
    plt.close(fig)
    return path


def plot_curves(history: List[Dict], path, title: Optional[str] = None) -> Path:
    return plot_runs({title or 'run': history}, path, title)
