"""The bench figure: per mode/dtype, latency, activation memory and speed-up vs the baseline against resolution."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ['plot_bench']

MiB = 2 ** 20


def _series(rows: Sequence[Dict[str, Any]], value) -> Tuple[List[float], List[float]]:
    """(tokens, values) of the rows with a value, by increasing resolution."""
    points = sorted((r['size'][0] * r['size'][1] / 256, v) for r in rows if (v := value(r)) is not None)
    return [p[0] for p in points], [p[1] for p in points]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha='center', va='center', transform=ax.transAxes, color='0.4')
    ax.set_xticks([])
    ax.set_yticks([])


def _size_axis(ax, sizes: Sequence[Sequence[int]]) -> None:
    """Log tokens on x, ticks labelled with the measured sizes."""
    ticks = sorted({s[0] * s[1] / 256: f'{s[0]}²' if s[0] == s[1] else f'{s[0]}×{s[1]}' for s in sizes}.items())
    ax.set_xscale('log')
    ax.set_xticks([t for t, _ in ticks])
    ax.set_xticklabels([label for _, label in ticks], rotation=45 if len(ticks) > 5 else 0)
    ax.minorticks_off()
    ax.set_xlabel('resolution (log tokens, 16×16 patches)')
    ax.grid(True, which='major', alpha=0.3)


def _log_y(ax) -> None:
    """Log y with plain-number labels, denser when the data span less than a few decades."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    ax.set_yscale('log')
    low, high = ax.get_ylim()
    decades = math.log10(high / low) if low > 0 else 3
    if decades < 1:  # within a decade, evenly spaced round numbers read best
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    else:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5) if decades < 2.5 else (1,)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _latency(m: Dict[str, Any]):
    return (m.get('time') or {}).get('median_ms')


def _activation_mib(m: Dict[str, Any]):
    value = (m.get('memory') or {}).get('activation_bytes')
    return None if value is None else value / MiB


def plot_bench(result: Dict[str, Any], path: str) -> None:
    """Save the figure for ``result`` (run_bench's output) as a PNG at ``path``: one row per mode/dtype, columns
    latency, activation memory and speed-up vs the baseline (columns without any numbers are left out)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    baseline = result['settings']['baseline']
    labels = [v['label'] for v in result['variants']]
    palette = colormaps['tab10' if len(labels) <= 10 else 'tab20']  # distinct colours up to 20 variants
    colors = {label: palette(i % palette.N) for i, label in enumerate(labels)}
    combos = list(dict.fromkeys((m['mode'], m['dtype']) for m in result['measurements']))
    measured, ratios = result['measurements'], result['ratios']
    columns = [kind for kind, present in (
        ('latency', any(_latency(m) is not None for m in measured)),
        ('memory', any(_activation_mib(m) is not None for m in measured)),
        ('speedup', any(r['speedup'] is not None for r in ratios))) if present] or ['latency']
    fig = Figure(figsize=(5.4 * len(columns) + 0.6, 4.6 * len(combos) + 0.4), layout='constrained')
    FigureCanvasAgg(fig)  # Agg canvas, no pyplot state
    axes = fig.subplots(len(combos), len(columns), squeeze=False)
    titles = dict(latency='latency (median ms)', memory='peak activation memory (MiB)',
                  speedup=f'speed-up vs {baseline} (>1: faster)')
    for row, (mode, dtype) in enumerate(combos):
        rows = [m for m in measured if m['mode'] == mode and m['dtype'] == dtype]
        for ax, kind in zip(axes[row], columns):
            ax.set_title(f'{mode} {dtype}: {titles[kind]}', fontsize=10)
            drawn = False
            for label in labels:
                if kind == 'speedup':
                    x, y = _series([r for r in ratios if (r['variant'], r['mode'], r['dtype']) == (label, mode, dtype)],
                                   lambda r: r['speedup'])
                else:
                    x, y = _series([m for m in rows if m['variant'] == label],
                                   _latency if kind == 'latency' else _activation_mib)
                if not x:
                    continue
                drawn = True
                is_base = label == baseline
                ax.plot(x, y, color=colors[label], marker='o', lw=2.4 if is_base else 1.6, ls='--' if is_base else '-',
                        label=label + (' (baseline)' if is_base else ''))
            if not drawn:
                _empty(ax, 'not measured')
                continue
            if kind == 'speedup':
                ax.axhline(1.0, color='black', lw=1, alpha=0.7)
                crossings = [c for c in result['crossovers']
                             if (c['mode'], c['dtype']) == (mode, dtype) and c['tokens']]
                for k, c in enumerate(crossings):
                    ax.plot([c['tokens']], [1.0], marker='*', ms=16, color=colors[c['variant']], mec='black',
                            ls='none', zorder=5)
                    ax.annotate(f'≈{c["side"]:.0f}²', (c['tokens'], 1.0), textcoords='offset points',
                                xytext=(-12, -16 - 12 * k), color=colors[c['variant']], fontsize=9, ha='right')
            _log_y(ax)
            _size_axis(ax, [m['size'] for m in rows])
            ax.legend(fontsize=7.5)
    machine, settings = result['machine'], result['settings']
    fig.suptitle(f'vittt bench: {machine["device_name"]}, {settings["threads"]} thread(s), batch '
                 f'{settings["batch_size"]}, torch {machine["torch"]}   (★ interpolated crossover)', fontsize=11)
    from ..engine.plots import save_figure
    save_figure(fig, path)
