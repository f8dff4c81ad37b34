"""The issue-5 targets table (ViT³-T / Vittt-T vs DeiT-T) from the bench.json files of `vittt bench` runs.

    python benchmarks/targets.py results/bench/bench.json [more bench.json ...]

Every ratio is taken between measurements of the same run (interleaved timing; memory in fresh processes).
"""
from __future__ import annotations

import json
import sys
from typing import Dict, List, Optional, Tuple

DEIT, DEIT_MATH = 'deit_tiny_patch16_224', 'deit_tiny_patch16_224+math'

# (what, variant, baseline, mode, size, quantity, comparison, bound)
TARGETS = [
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


def load(paths: List[str]) -> Dict[Tuple[str, str, int], dict]:
    """(variant, mode, square size) -> measurement; later files win; each entry remembers its run."""
    found = {}
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        for m in result['measurements']:
            if m['size'][0] == m['size'][1]:
                found[m['variant'], m['mode'], m['size'][0]] = dict(m, run=path)
    return found


def ratio(found, variant: str, baseline: str, mode: str, size: int, quantity: str) -> Optional[float]:
    a, b = found.get((variant, mode, size)), found.get((baseline, mode, size))
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


def main(paths: List[str]) -> int:
    found = load(paths)
    print('| target | measured | bound | met |')
    print('| --- | ---: | ---: | --- |')
    for what, variant, baseline, mode, size, quantity, op, bound in TARGETS:
        value = ratio(found, variant, baseline, mode, size, quantity)
        if value is None:
            print(f'| {what} | not measured | {op} {bound:g} | – |')
            continue
        met = value <= bound if op == '<=' else value >= bound
        shown = f'{value:.2f}×' if quantity == 'speedup' else f'{value:.3f}'
        print(f'| {what} | {shown} | {op} {bound:g} | {"yes" if met else "**no**"} |')
    return 0


if __name__ == '__main__':
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
