"""Ratios against the baseline, crossover resolutions, the markdown report, and writing bench.json/.md/.png."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..io import atomic_write
from .spec import PATCH

__all__ = ['speedup', 'memory_ratio', 'Crossover', 'find_crossover', 'compute_ratios', 'compute_crossovers',
           'render_markdown', 'write_outputs']

MiB = 2 ** 20


def speedup(baseline_ms: Optional[float], variant_ms: Optional[float]) -> Optional[float]:
    """baseline time / variant time: above 1 the variant is faster than the baseline."""
    if not baseline_ms or not variant_ms:
        return None
    return baseline_ms / variant_ms


def memory_ratio(variant_bytes: Optional[int], baseline_bytes: Optional[int]) -> Optional[float]:
    """variant activation / baseline activation: below 1 the variant needs less memory."""
    if variant_bytes is None or not baseline_bytes:
        return None
    return variant_bytes / baseline_bytes


@dataclass
class Crossover:
    """Where a variant overtakes the baseline. ``status``: 'crosses', 'always' (faster at every size), 'never'
    (not faster at the largest size) or 'unknown' (no size with both timings).

    ``size``: the smallest measured size from which on the variant is faster at every larger size (the first size
    when always faster). ``tokens`` / ``side``: where the speed-up reaches 1 by linear interpolation of log speed-up
    in log tokens between the last slower and the first faster size (only for 'crosses'); ``side`` is the square
    image side in pixels with that many tokens."""
    status: str
    size: Optional[List[int]] = None
    tokens: Optional[float] = None
    side: Optional[float] = None


def find_crossover(sizes: Sequence[Sequence[int]], speedups: Sequence[float]) -> Crossover:
    """The crossover of one variant from its speed-ups over the baseline at ``sizes`` (any order)."""
    points = sorted(zip((tuple(s) for s in sizes), speedups), key=lambda p: (p[0][0] * p[0][1], p[0]))
    if not points:
        return Crossover('unknown')
    first = len(points)
    while first > 0 and points[first - 1][1] > 1:
        first -= 1
    if first == len(points):
        return Crossover('never')
    if first == 0:
        return Crossover('always', size=list(points[0][0]))
    (slow_size, slow_speedup), (fast_size, fast_speedup) = points[first - 1], points[first]
    x0, x1 = math.log(slow_size[0] * slow_size[1]), math.log(fast_size[0] * fast_size[1])
    y0, y1 = math.log(slow_speedup), math.log(fast_speedup)
    pixels = math.exp(x0 + (x1 - x0) * (0 - y0) / (y1 - y0))
    return Crossover('crosses', size=list(fast_size), tokens=pixels / PATCH ** 2, side=math.sqrt(pixels))


def _activation(entry: Dict[str, Any]) -> Optional[int]:
    return (entry.get('memory') or {}).get('activation_bytes')


def _median_ms(entry: Dict[str, Any]) -> Optional[float]:
    return (entry.get('time') or {}).get('median_ms')


def compute_ratios(measurements: Sequence[Dict[str, Any]], baseline: str) -> List[Dict[str, Any]]:
    """Speed-up and activation-memory ratio of every non-baseline variant against the baseline at the same mode,
    dtype and size (None where either side has no number)."""
    by_key = {(m['mode'], m['dtype'], tuple(m['size']), m['variant']): m for m in measurements}
    ratios = []
    for m in measurements:
        base = by_key.get((m['mode'], m['dtype'], tuple(m['size']), baseline))
        if m['variant'] == baseline or base is None:
            continue
        ratios.append(dict(variant=m['variant'], baseline=baseline, mode=m['mode'], dtype=m['dtype'],
                           size=list(m['size']), tokens=m['tokens'],
                           speedup=speedup(_median_ms(base), _median_ms(m)),
                           memory_ratio=memory_ratio(_activation(m), _activation(base))))
    return ratios


def compute_crossovers(ratios: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One crossover per (variant, mode, dtype) from the speed-ups in ``ratios``."""
    groups: Dict[Tuple[str, str, str, str], List[Dict[str, Any]]] = {}
    for r in ratios:
        groups.setdefault((r['variant'], r['baseline'], r['mode'], r['dtype']), []).append(r)
    crossovers = []
    for (variant, baseline, mode, dtype), rows in groups.items():
        timed = [r for r in rows if r['speedup'] is not None]
        found = find_crossover([r['size'] for r in timed], [r['speedup'] for r in timed])
        crossovers.append(dict(variant=variant, baseline=baseline, mode=mode, dtype=dtype, **asdict(found)))
    return crossovers


def _fmt(value: Optional[float], spec: str, suffix: str = '') -> str:
    return '–' if value is None else f'{value:{spec}}{suffix}'


def _problem(m: Dict[str, Any]) -> Optional[str]:
    memory = m.get('memory') or {}
    return m.get('error') or memory.get('error') or memory.get('reason')


def _table_row(m: Dict[str, Any], ratio: Dict[str, Any], is_baseline: bool) -> Dict[str, str]:
    """One measurement as table cells, keyed by column header ('–' where there is no number)."""
    t, mem = m.get('time') or {}, m.get('memory') or {}
    activation, total, fraction = _activation(m), mem.get('total_bytes'), t.get('fraction_of_matmul')
    return {
        'variant': m['variant'], 'size': f'{m["size"][0]}×{m["size"][1]}', 'tokens': str(m['tokens']),
        'GMACs': _fmt(m['macs'] / 1e9 if m['macs'] else None, '.3g'),
        'median ms': _fmt(t.get('median_ms'), '.1f'),
        'min–max ms': f'{t["min_ms"]:.1f}–{t["max_ms"]:.1f}' if t else '–',
        'img/s': _fmt(t.get('images_per_s'), '.1f'),
        'speed-up': 'base' if is_baseline and t else _fmt(ratio.get('speedup'), '.2f', '×'),
        'act. MiB': _fmt(activation / MiB if activation is not None else None, '.1f'),
        'total MiB': _fmt(total / MiB if total is not None else None, '.0f'),
        'mem. ratio': 'base' if is_baseline and activation is not None else _fmt(ratio.get('memory_ratio'), '.2f'),
        '% matmul': _fmt(fraction * 100 if fraction is not None else None, '.1f', '%'),
    }


def _markdown_table(rows: Sequence[Dict[str, str]]) -> List[str]:
    """A markdown table of ``rows``, leaving out the columns without a single number (e.g. under --no-memory)."""
    if not rows:
        return []
    headers = [h for h in rows[0] if any(r[h] != '–' for r in rows)]
    align = ['---' if h in ('variant', 'size') else '---:' for h in headers]
    return (['| ' + ' | '.join(headers) + ' |', '|' + '|'.join(align) + '|']
            + ['| ' + ' | '.join(r[h] for h in headers) + ' |' for r in rows])


def _combos(result: Dict[str, Any]) -> List[Tuple[str, str]]:
    return list(dict.fromkeys((m['mode'], m['dtype']) for m in result['measurements']))


def _describe_crossover(c: Dict[str, Any]) -> str:
    if c['status'] == 'never':
        return 'not faster at the largest size'
    first = f'{c["size"][0]}×{c["size"][1]}'
    if c['status'] == 'always':
        return f'faster at every size (from {first} on)'
    return (f'faster from {first} on; speed-up 1 at about {c["side"]:.0f}² px ({c["tokens"]:.0f} tokens, '
            f'interpolated)')


def _load_text(machine: Dict[str, Any]) -> str:
    start, end = machine.get('load_average_start'), machine.get('load_average_end')
    if not start or not end:
        return ''
    return f'; load average {start[0]:.1f} at the start, {end[0]:.1f} at the end'


def render_markdown(result: Dict[str, Any]) -> str:
    """The report: settings, the matmul ceiling, one table per mode/dtype, crossovers and notes."""
    settings, machine = result['settings'], result['machine']
    baseline = settings['baseline']
    lines = ['# vittt bench', '',
             f'{machine["device_name"]} ({machine["device"]}), {settings["threads"]} thread(s); torch '
             f'{machine["torch"]}, timm {machine["timm"]}; batch {settings["batch_size"]}'
             + (f' (train: {settings["train_batch_size"]})' if 'train' in settings['modes']
                and settings.get('train_batch_size', settings['batch_size']) != settings['batch_size'] else '')
             + ', '
             f'{settings["repeats"]} round(s) after {settings["warmup"]} warm-up call(s); baseline `{baseline}`'
             + _load_text(machine) + '.', '']
    for dtype, mm in result['matmul'].items():
        lines.append(f'Matmul ceiling ({dtype}, {mm["n"]}×{mm["n"]} @ {mm["n"]}×{mm["n"]}): '
                     f'{mm["gmacs_per_s"]:.1f} GMAC/s (median {mm["median_ms"]:.1f} ms).')
    ratios = {(r['variant'], r['mode'], r['dtype'], tuple(r['size'])): r for r in result['ratios']}
    order = [v['label'] for v in result['variants']]
    for mode, dtype in _combos(result):
        rows = [m for m in result['measurements'] if m['mode'] == mode and m['dtype'] == dtype]
        rows.sort(key=lambda m: (order.index(m['variant']), m['size'][0] * m['size'][1]))
        table = [_table_row(m, ratios.get((m['variant'], mode, dtype, tuple(m['size'])), {}),
                            m['variant'] == baseline) for m in rows]
        lines += ['', f'## {mode} {dtype}', ''] + _markdown_table(table)
        problems = [f'- {m["variant"]} at {m["size"][0]}×{m["size"][1]}: {_problem(m)}' for m in rows if _problem(m)]
        if problems:
            lines += ['', 'Not measured:', ''] + problems
    crossings = [c for c in result['crossovers'] if c['status'] != 'unknown']
    if crossings:
        lines += ['', f'## Crossover vs `{baseline}`', '']
        for c in crossings:
            lines.append(f'- {c["variant"]} ({c["mode"]} {c["dtype"]}): {_describe_crossover(c)}')
    lines += ['', '## Notes', ''] + [f'- {note}' for note in result['notes']]
    lines += ['', f'Command: `{" ".join(result["command"])}`', '']
    return '\n'.join(lines)


def write_outputs(result: Dict[str, Any], output_dir: str | Path) -> Dict[str, Path]:
    """Write bench.json, bench.md and bench.png into ``output_dir``, each atomically."""
    from .plot import plot_bench

    output_dir = Path(output_dir)
    markdown = render_markdown(result)
    paths = dict(json=output_dir / 'bench.json', markdown=output_dir / 'bench.md', plot=output_dir / 'bench.png')
    atomic_write(paths['json'], lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + '\n'))
    atomic_write(paths['markdown'], lambda tmp: Path(tmp).write_text(markdown))
    atomic_write(paths['plot'], lambda tmp: plot_bench(result, tmp))
    return paths
