"""The full dense comparison behind docs/dense.md: more backbones, several seeds, mean ± sd, and how evaluation cost
grows with resolution.

    python benchmarks/dense_compare.py [--tasks detection segmentation] [--backbones H-ViT³-nano PVTv2-b0 ...]
                                       [--seeds 0 1 2] [--steps N] [--sizes 192 384 512 768 1024]
                                       [--output results/dense_compare]

Every backbone trains from scratch under the demo's detector / segmenter and recipe (`dense_cpu_detection`,
`dense_cpu_segmentation`: same data order, steps and seed per seed index), exactly as `vittt dense demo` trains
its two. Killed runs resume where they stopped. Evaluation ms/image (batch 1, interleaved, median of 3) and the
peak resident memory of one evaluation (fresh process) are measured on the seed-0 models at each size. Writes
``compare.json``, ``compare.md`` and ``scaling.png`` into the output folder.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import vittt  # noqa: F401  (before torchvision / timm)
from vittt.engine import init_distributed
from vittt.io import atomic_write
from vittt.tasks.dense.demo import DEMO_BACKBONES, eval_latency, measure_eval_memory, train_backbone
from vittt.tasks.dense.run import resolve_dense_data

BACKBONES = dict(DEMO_BACKBONES, **{
    'ConvNeXt-atto': ('convnext_atto', {}),
    'ResNet10t': ('resnet10t', {}),
    'ViT³-T (SFP)': ('vit3_tiny', {}),
    'DeiT-T (SFP)': ('deit_tiny_patch16_224', dict(dynamic_img_size=True, dynamic_img_pad=True)),
})
METRICS = {'detection': ('bbox_AP', 'bbox_AP50', 'segm_AP', 'segm_AP50'), 'segmentation': ('mIoU', 'aAcc')}


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _markdown(result) -> str:
    lines = ['# Dense comparison', '', f'Command: `{result["command"]}`; {result["wall_min"]:.0f} min on '
             f'{result["threads"]} threads; seeds {result["seeds"]}.', '']
    for task, rows in result['tasks'].items():
        sizes = result['sizes']
        lines += [f'## {task}', '', '| backbone | params | ' + ' | '.join(f'{m} (mean ± sd)' for m in METRICS[task])
                  + ' | train img/s | ' + ' | '.join(f'eval ms {s}²' for s in sizes) + ' | '
                  + ' | '.join(f'eval MB {s}²' for s in sizes) + ' |',
                  '|' + ' --- |' * (3 + len(METRICS[task]) + 2 * len(sizes))]
        for label, row in rows.items():
            stats = [row['summary'][m] for m in METRICS[task]]
            lines.append(f'| {label} | {row["backbone_params"] / 1e6:.2f}M | '
                         + ' | '.join('—' if m is None else f'{m:.1f} ± {sd:.1f}' for m, sd in stats)
                         + f' | {row["train_img_s"]:.2f} | '
                         + ' | '.join('—' if row['eval_ms'].get(str(s)) is None else f'{row["eval_ms"][str(s)]:.0f}'
                                      for s in sizes) + ' | '
                         + ' | '.join('—' if not row['memory'].get(str(s), {}).get('activation_bytes') else
                                      f'{row["memory"][str(s)]["activation_bytes"] / 2 ** 20:.0f}' for s in sizes)
                         + ' |')
        lines += ['']
    lines += ['![evaluation time vs resolution](scaling.png)', '']
    return '\n'.join(lines)


def _plot(result, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    tasks = list(result['tasks'])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for label, row in result['tasks'][task].items():
            points = [(s, row['eval_ms'].get(str(s))) for s in result['sizes']]
            points = [(s, ms) for s, ms in points if ms]
            ax.plot([s for s, _ in points], [ms for _, ms in points], marker='o', label=label)
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlabel('image side (px)')
        ax.set_ylabel('eval ms / image (batch 1)')
        ax.set_title(task)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tasks', nargs='+', default=['detection', 'segmentation'])
    parser.add_argument('--backbones', nargs='+', default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--steps', type=int, help='updates per run (default: the recipe\'s)')
    parser.add_argument('--sizes', nargs='+', type=int, default=[192, 384, 512, 768, 1024])
    parser.add_argument('--data', default='fmnist-dense')
    parser.add_argument('--output', default='results/dense_compare')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    output, started = Path(args.output), time.perf_counter()
    info = init_distributed('cpu')
    root = resolve_dense_data(args.data, info)
    shown = sys.argv[1:] if argv is None else list(argv)
    result = dict(command='python benchmarks/dense_compare.py ' + ' '.join(shown), seeds=args.seeds,
                  sizes=args.sizes, tasks={})
    for task in args.tasks:
        rows, models = {}, {}
        for label in args.backbones:
            model, kwargs = BACKBONES[label]
            runs = []
            for seed in args.seeds:
                overrides = dict(seed=seed, **({} if args.steps is None else dict(steps=args.steps)))
                run = output / task / f'{label.replace("³", "3").replace(" ", "_")}-seed{seed}'
                row, net, _ = train_backbone(task, model, kwargs, root, run, info, overrides, not args.no_progress)
                runs.append(row)
                if seed == args.seeds[0]:
                    models[label] = (task, net)
            rows[label] = dict(runs[0], runs=runs, train_img_s=statistics.fmean(r['train_img_s'] for r in runs),
                               summary={m: _mean_sd([r['metrics'].get(m) for r in runs]) for m in METRICS[task]})
        latency = eval_latency(models, args.sizes)
        for label, row in rows.items():
            row['eval_ms'] = {str(s): latency[label][s] for s in args.sizes}
            row['memory'] = {str(s): measure_eval_memory(row['checkpoint'], task, s) for s in args.sizes}
        result['tasks'][task] = rows
    result.update(wall_min=(time.perf_counter() - started) / 60, threads=__import__('torch').get_num_threads())
    output.mkdir(parents=True, exist_ok=True)
    atomic_write(output / 'compare.json', lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + '\n'))
    atomic_write(output / 'compare.md', lambda tmp: Path(tmp).write_text(_markdown(result)))
    _plot(result, output / 'scaling.png')
    print(_markdown(result))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
