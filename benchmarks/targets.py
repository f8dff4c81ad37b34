"""The targets tables from the bench.json files of `vittt bench` runs: issue 5 (ViT³-T / Vittt-T vs DeiT-T at
high resolution) and issue 15 (224² training and throughput, H-ViT³-T vs ConvNeXt-T, Vittt-T at 1280²).

    python benchmarks/targets.py results/bench/bench.json [more bench.json ...]
    python benchmarks/targets.py --issue 15 docs/bench/issue15/*/bench.json

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


def main(paths: List[str], issue: str = '5') -> int:
    found = load(paths)
    print('| target | measured | bound | met |')
    print('| --- | ---: | ---: | --- |')
    for what, variant, baseline, mode, size, quantity, op, bound, *batch in TARGETS[issue]:
        value = ratio(found, variant, baseline, mode, size, quantity, *batch)
        if value is None:
            print(f'| {what} | not measured | {op} {bound:g} | – |')
            continue
        met = value <= bound if op == '<=' else value >= bound
        shown = f'{value:.2f}×' if quantity == 'speedup' else f'{value:.3f}'
        print(f'| {what} | {shown} | {op} {bound:g} | {"yes" if met else "**no**"} |')
    return 0


if __name__ == '__main__':
    args = sys.argv[1:]
    issue = '5'
    if args[:1] == ['--issue']:
        issue, args = args[1], args[2:]
    if not args or issue not in TARGETS:
        sys.exit(__doc__)
    sys.exit(main(args, issue))
