"""The targets tables from the bench.json files of `vittt bench` runs: issue 5 (ViT³-T / Vittt-T vs DeiT-T at
high resolution) and issue 15 (224² training and throughput, H-ViT³-T vs ConvNeXt-T, Vittt-T at 1280²).

    python benchmarks/targets.py results/bench/bench.json [more bench.json ...]
    python benchmarks/targets.py --issue 15 docs/bench/issue15/*/bench.json
    python benchmarks/targets.py --issue 15 --plot docs/bench/issue15/targets.png docs/bench/issue15/*/bench.json

Every ratio is taken between measurements of the same run (interleaved timing; memory in fresh processes), at the
batch size the row names.
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Tuple

DEIT, DEIT_MATH = 'deit_tiny_patch16_224', 'deit_tiny_patch16_224+math'
CONVNEXT = 'convnext_tiny'

# (what, variant, baseline, mode, size, quantity, comparison, bound[, batch size]); the batch, where given, must be
# the measurement's (issue 15 compares at several batch sizes); without it any batch size is taken
TARGETS_5 = [
    ('latency ViT³-T / DeiT-T fused, 224²', 'vit3_tiny', DEIT, 'infer', 224, 'time', '<=', 1.0),
    ('speed-up ViT³-T vs DeiT-T fused, 1248²', 'vit3_tiny', DEIT, 'infer', 1248, 'speedup', '>=', 4.6),
    ('activation memory ViT³-T / DeiT-T fused, 1248² (default)', 'vit3_tiny', DEIT, 'infer', 1248, 'memory', '<=',
     1.0),
    ('activation memory ViT³-T lean / DeiT-T fused, 1248²', 'vit3_tiny+lean', DEIT, 'infer', 1248, 'memory', '<=',
     0.5),
    ('activation memory ViT³-T / DeiT-T math, 1248² (paper: 9.7 %)', 'vit3_tiny', DEIT_MATH, 'infer', 1248, 'memory',
     '<=', 0.097),
    ('train step time ViT³-T / DeiT-T, 224², batch 32', 'vit3_tiny', DEIT, 'train', 224, 'time', '<=', 1.0),
    ('train step memory ViT³-T / DeiT-T, 224², batch 32', 'vit3_tiny', DEIT, 'train', 224, 'memory', '<=', 1.0),
    ('speed-up Vittt-T vs DeiT-T fused, 1280² (paper: 4.72×)', 'vision_ttt_tiny', DEIT, 'infer', 1280, 'speedup',
     '>=', 4.72),
]

TARGETS_15 = [
    ('ViT³-T / DeiT-T train step time, 224², batch 32', 'vit3_tiny', DEIT, 'train', 224, 'time', '<=', 1.0, 32),
    ('ViT³-T / DeiT-T inference throughput, 224², batch 64', 'vit3_tiny', DEIT, 'infer', 224, 'speedup', '>=', 1.0,
     64),
    ('ViT³-T / DeiT-T latency, 224², batch 1', 'vit3_tiny', DEIT, 'infer', 224, 'time', '<=', 1.0, 1),
    ('H-ViT³-T / ConvNeXt-T inference throughput, 224², batch 16', 'hvit3_tiny', CONVNEXT, 'infer', 224, 'speedup',
     '>=', 1.0, 16),
    ('H-ViT³-T / ConvNeXt-T inference throughput, 1024², batch 1', 'hvit3_tiny', CONVNEXT, 'infer', 1024, 'speedup',
     '>=', 1.0, 1),
    ('H-ViT³-T / ConvNeXt-T train step time, 224², batch 16', 'hvit3_tiny', CONVNEXT, 'train', 224, 'time', '<=', 1.0,
     16),
    ('Vittt-T vs DeiT-T speed-up, 1280², batch 1 (paper: 4.72×)', 'vision_ttt_tiny', DEIT, 'infer', 1280, 'speedup',
     '>=', 4.72, 1),
    ('no regression: ViT³-T vs DeiT-T speed-up, 1248², batch 1', 'vit3_tiny', DEIT, 'infer', 1248, 'speedup', '>=',
     4.6, 1),
    ('no regression: activation memory ViT³-T / DeiT-T, 1248² (default)', 'vit3_tiny', DEIT, 'infer', 1248, 'memory',
     '<=', 1.0, 1),
    ('no regression: activation memory ViT³-T lean / DeiT-T, 1248²', 'vit3_tiny+lean', DEIT, 'infer', 1248, 'memory',
     '<=', 0.5, 1),
]
TARGETS = {'5': TARGETS_5, '15': TARGETS_15}


def load(paths: List[str]) -> Dict[Tuple, dict]:
    """(variant, mode, square size[, batch size]) -> fp32 measurement; later files win; each entry remembers its
    run."""
    found = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        for m in result['measurements']:
            if m['size'][0] == m['size'][1] and m.get('dtype', 'fp32') == 'fp32':
                entry = dict(m, run=path)
                found[m['variant'], m['mode'], m['size'][0]] = entry
                found[m['variant'], m['mode'], m['size'][0], m['batch_size']] = entry
    return found


def ratio(found, variant: str, baseline: str, mode: str, size: int, quantity: str,
          batch: Optional[int] = None) -> Optional[float]:
    key = (mode, size) if batch is None else (mode, size, batch)
    a, b = found.get((variant,) + key), found.get((baseline,) + key)
    if a is None or b is None or a['run'] != b['run']:
        return None  # ratios only within one run
    if quantity in ('time', 'speedup'):
        if not a.get('time') or not b.get('time'):
            return None
        r = a['time']['median_ms'] / b['time']['median_ms']
        return 1 / r if quantity == 'speedup' else r
    if not (a.get('memory') or {}).get('activation_bytes') or not (b.get('memory') or {}).get('activation_bytes'):
        return None
    return a['memory']['activation_bytes'] / b['memory']['activation_bytes']


def main(paths: List[str], issue: str = '5', plot: Optional[str] = None) -> int:
    found = load(paths)
    print('| target | measured | bound | met |')
    print('| --- | ---: | ---: | --- |')
    rows = []
    for what, variant, baseline, mode, size, quantity, op, bound, *batch in TARGETS[issue]:
        value = ratio(found, variant, baseline, mode, size, quantity, *batch)
        if value is None:
            print(f'| {what} | not measured | {op} {bound:g} | – |')
            continue
        met = value <= bound if op == '<=' else value >= bound
        shown = f'{value:.2f}×' if quantity == 'speedup' else f'{value:.3f}'
        print(f'| {what} | {shown} | {op} {bound:g} | {"yes" if met else "**no**"} |')
        rows.append((what, shown, value / bound if op == '>=' else bound / value))
    if plot:
        write_plot(rows, plot, f'issue {issue} targets')
    return 0


def write_plot(rows, path: str, title: str) -> None:
    """Horizontal bars, one per target: how far the measurement is from its bound as a factor (> 1: met), on a log
    axis so that 2× too slow and 2× better sit at equal distances from the line. Written to a temporary file, then
    renamed."""
    import os

    import matplotlib
    import matplotlib.ticker
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    labels = [what for what, _, _ in rows][::-1]
    margins = [m for _, _, m in rows][::-1]
    ax.barh(labels, [m - 1 for m in margins], left=1, color=['tab:green' if m >= 1 else 'tab:red' for m in margins])
    for y, ((_, shown, m)) in enumerate(rows[::-1]):
        ax.text(m, y, f' {shown} ', va='center', ha='left' if m >= 1 else 'right', fontsize=8)
    ax.axvline(1, color='black', lw=1)
    ax.set_xscale('log')
    ax.set_xlim(min(margins + [1]) / 1.35, max(margins + [1]) * 1.3)    # room for the value labels
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.25, 0.5, 0.75, 1, 1.5, 2, 4]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}'))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel('measured against its bound (> 1: met; log scale)')
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis='y', labelsize=8)
    fig.tight_layout()
    tmp = f'{path}.tmp.png'
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == '__main__':
    args = sys.argv[1:]
    issue, plot = '5', None
    while args[:1] in (['--issue'], ['--plot']):
        if args[0] == '--issue':
            issue = args[1]
        else:
            plot = args[1]
        args = args[2:]
    if not args or issue not in TARGETS:
        sys.exit(__doc__)
    sys.exit(main(args, issue, plot))
