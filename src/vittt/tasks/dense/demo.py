"""``vittt dense demo``: a small H-ViT³ against a same-size attention backbone (PVTv2-b0) under the same Mask R-CNN
and the same UPerNet, on the offline Fashion-MNIST canvases, with one recipe per task, the same data order, steps and
seed.

The report (``report.md``, ``results.json``, curves, detections and segmentations of validation images) gives box
AP, mask AP, AP50, mIoU, training images/s, evaluation ms/image at 192², 512² and 1024² (batch 1, medians of
interleaved repeats in this process) and the peak resident memory of one evaluation at each size (a fresh process
per configuration, as ``vittt bench`` measures memory).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any, Dict, List, Optional

import torch

__all__ = ['DEMO_BACKBONES', 'DEMO_RECIPES', 'DEMO_SIZES', 'run_dense_demo', 'train_backbone', 'eval_latency',
           'measure_eval_memory']

# label -> (model name, constructor overrides); the two have 3.5M / 3.4M backbone parameters
DEMO_BACKBONES: Dict[str, Any] = {
    'H-ViT³-nano': ('hvit3_tiny', dict(dims=[32, 64, 160, 256], depths=[1, 2, 3, 2], num_heads=[1, 2, 5, 8])),
    'PVTv2-b0': ('pvt_v2_b0', {}),
}
DEMO_RECIPES = {'detection': 'dense_cpu_detection', 'segmentation': 'dense_cpu_segmentation'}
DEMO_SIZES = (192, 512, 1024)
_MEMORY_TIMEOUT_S = 600


def _set_eval_size(model, task: str, size: int) -> None:
    if task == 'detection':  # the CPU preset never resizes its 192² canvases: let it take the size asked
        model.transform.min_size, model.transform.max_size = (size,), size


def _eval_input(task: str, size: int):
    torch.manual_seed(0)
    image = torch.rand(3, size, size)
    return [image] if task == 'detection' else image[None]


def eval_latency(models: Dict[str, Any], sizes=DEMO_SIZES, repeats: int = 3) -> Dict[str, Dict[int, float]]:
    """``{label: {size: ms per image}}``: batch-1 evaluation of each ``(task, model)``, interleaved, median of
    ``repeats`` after one warm-up call."""
    out: Dict[str, Dict[int, float]] = {label: {} for label in models}
    with torch.no_grad():
        for size in sizes:
            times: Dict[str, List[float]] = {label: [] for label in models}
            for rep in range(repeats + 1):
                for label, (task, model) in models.items():
                    _set_eval_size(model, task, size)
                    x = _eval_input(task, size)
                    start = time.perf_counter()
                    model(x)
                    if rep:
                        times[label].append(time.perf_counter() - start)
            for label in models:
                out[label][size] = 1000.0 * median(times[label])
    return out


def _memory_worker(config: Dict[str, Any]) -> Dict[str, Any]:
    """In a fresh process: load the checkpoint, then the peak resident set of one evaluation at ``size``."""
    from ...bench.memory import _reset_peak_rss, _rss_file, read_proc_status
    from .run import load_dense_checkpoint

    torch.set_num_threads(config['threads'])
    reason = _reset_peak_rss()
    if reason:
        return dict(error=reason)
    task, model, _ = load_dense_checkpoint(config['checkpoint'], use_ema=False)
    _set_eval_size(model, config['task'], config['size'])
    x = _eval_input(config['task'], config['size'])
    file_before, before = _rss_file(), read_proc_status('VmRSS')
    _reset_peak_rss()
    with torch.no_grad():
        model(x)
    peak = read_proc_status('VmHWM')
    return dict(total_bytes=peak, activation_bytes=max(peak - before - max(_rss_file() - file_before, 0), 0))


def measure_eval_memory(checkpoint, task: str, size: int, threads: int = 2) -> Dict[str, Any]:
    config = dict(checkpoint=str(checkpoint), task=task, size=size, threads=threads)
    command = [sys.executable, '-m', 'vittt.tasks.dense.demo', json.dumps(config)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_MEMORY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return dict(error=f'timed out after {_MEMORY_TIMEOUT_S} s')
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return dict(error=(done.stderr.strip().splitlines() or ['no output'])[-1])


def _draw_detections(path: Path, val_set, models: Dict[str, Any], count: int = 4, threshold: float = 0.3) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from ...engine.plots import save_figure
    from matplotlib.patches import Rectangle

    names = ['ground truth'] + list(models)
    fig, axes = plt.subplots(count, len(names), figsize=(3 * len(names), 3 * count), squeeze=False)
    with torch.no_grad():
        for row in range(count):
            image, target = val_set[row]
            results = [dict(boxes=target['boxes'], labels=target['labels'], masks=target['masks'][:, None].float(),
                            scores=torch.ones(len(target['boxes'])))]
            for _, model in models.values():
                _set_eval_size(model, 'detection', image.shape[-1])
                results.append(model([image])[0])
            for col, (name, res) in enumerate(zip(names, results)):
                ax = axes[row][col]
                shown = image.permute(1, 2, 0).clone()
                keep = res['scores'] >= threshold
                for k in keep.nonzero().flatten().tolist():
                    colour = torch.tensor(plt.cm.tab10((int(res['labels'][k]) - 1) % 10)[:3], dtype=torch.float32)
                    mask = res['masks'][k, 0] >= 0.5
                    shown[mask] = 0.5 * shown[mask] + 0.5 * colour
                    x1, y1, x2, y2 = res['boxes'][k].tolist()
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color=colour.tolist(), lw=1.5))
                    text = val_set.class_names[int(res['labels'][k]) - 1]
                    ax.text(x1, y1, text if col == 0 else f'{text} {float(res["scores"][k]):.2f}', fontsize=6,
                            color='white', va='bottom', bbox=dict(facecolor=colour.tolist(), alpha=0.6, pad=0.5, lw=0))
                ax.imshow(shown.clamp(0, 1).numpy())
                ax.set_axis_off()
                if row == 0:
                    ax.set_title(name, fontsize=10)
    fig.suptitle(f'Mask R-CNN on validation canvases (score >= {threshold})')
    fig.tight_layout()
    save_figure(fig, path)


def _draw_segmentations(path: Path, val_set, models: Dict[str, Any], count: int = 4) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from ...engine.plots import save_figure

    names = ['image', 'ground truth'] + list(models)
    fig, axes = plt.subplots(count, len(names), figsize=(3 * len(names), 3 * count), squeeze=False)
    from matplotlib.colors import ListedColormap
    colours = [(0.0, 0.0, 0.0)] + [plt.cm.tab10(i)[:3] for i in range(val_set.num_classes - 1)]
    cmap = ListedColormap(colours)  # background black, one tab10 colour per class (as the detection picture)
    with torch.no_grad():
        for row in range(count):
            image, label = val_set[row]
            panels = [image.permute(1, 2, 0).numpy(), label.numpy()]
            panels += [model(image[None]).argmax(1)[0].numpy() for _, model in models.values()]
            for col, (name, panel) in enumerate(zip(names, panels)):
                ax = axes[row][col]
                if col == 0:
                    ax.imshow(panel)
                else:
                    ax.imshow(panel, cmap=cmap, vmin=0, vmax=val_set.num_classes - 1, interpolation='nearest')
                ax.set_axis_off()
                if row == 0:
                    ax.set_title(name, fontsize=10)
    fig.suptitle('UPerNet on validation canvases (colour = class, black = background)')
    fig.tight_layout()
    save_figure(fig, path)


def _train_rate(history: List[Dict[str, Any]]) -> float:
    seconds = sum(r['time_s'] for r in history)
    images = sum(r['train_img_s'] * r['time_s'] for r in history)
    return images / seconds if seconds else float('nan')


def _fmt(v, digits=1):
    return '—' if v is None else f'{v:.{digits}f}'


def _report(results: Dict[str, Any], meta: Dict[str, Any]) -> str:
    lines = [f'# vittt dense demo: {" vs ".join(DEMO_BACKBONES)}', '',
             f'Offline Fashion-MNIST canvases (`vittt data make-dense`: {meta["data"]}), from scratch on CPU '
             f'({meta["threads"]} threads), same detector / segmenter, recipe, data order, steps and seed per task. '
             f'Wall time of the whole demo: **{meta["wall_s"] / 60:.1f} min**.', '']
    for task, title, metrics in (('detection', 'Mask R-CNN (`dense_cpu_detection`)',
                                  ('bbox_AP', 'bbox_AP50', 'segm_AP', 'segm_AP50')),
                                 ('segmentation', 'UPerNet (`dense_cpu_segmentation`)', ('mIoU', 'aAcc'))):
        rows = results[task]
        any_row = next(iter(rows.values()))
        lines += [f'## {title}: {any_row["updates"]} updates of batch {any_row["batch_size"]}', '',
                  '| backbone | params (backbone / all) | ' + ' | '.join(metrics) + ' | train img/s | train min | '
                  + ' | '.join(f'eval ms {s}²' for s in DEMO_SIZES) + ' | '
                  + ' | '.join(f'eval MB {s}²' for s in DEMO_SIZES) + ' |',
                  '|' + ' --- |' * (3 + len(metrics) + 2 * len(DEMO_SIZES) + 1)]
        for label, r in rows.items():
            mem = [r['memory'].get(str(s), {}).get('activation_bytes') for s in DEMO_SIZES]
            lines.append(f'| {label} | {r["backbone_params"] / 1e6:.2f}M / {r["params"] / 1e6:.2f}M | '
                         + ' | '.join(_fmt(r['metrics'].get(m)) for m in metrics)
                         + f' | {r["train_img_s"]:.2f} | {r["train_s"] / 60:.1f} | '
                         + ' | '.join(_fmt(r['eval_ms'][str(s)], 0) for s in DEMO_SIZES) + ' | '
                         + ' | '.join(_fmt(m / 2 ** 20 if m else None, 0) for m in mem) + ' |')
        lines += ['', f'![{task} curves]({task}_curves.png)', '',
                  f'![{task} examples]({"detections" if task == "detection" else "segmentations"}.png)', '']
    lines += ['AP and mIoU in percent (pycocotools on the validation json; confusion-matrix mIoU over 11 classes with '
              'the background). Eval ms and MB: batch 1 on random images of that size with the trained model (MB: the '
              'growth of the peak resident set during one evaluation in a fresh process; totals in results.json). One '
              'seed: differences smaller than the seed-to-seed spread of `benchmarks/dense_compare.py` '
              '(docs/dense.md) are noise.', '']
    return '\n'.join(lines)


def train_backbone(task: str, model: str, kwargs: Dict[str, Any], root, run: Path, info, overrides: Dict[str, Any],
                   progress: bool = True):
    """Train ``model`` (with ``kwargs``) on ``task``'s demo recipe (plus ``overrides``) into ``run``, resuming a
    killed run; returns ``(result row, trained model in eval mode, history)``."""
    from ...engine import Trainer, load_recipe
    from .run import build_dense_datasets, build_task

    recipe = load_recipe(DEMO_RECIPES[task], dict(overrides, model=model, model_kwargs=kwargs))
    train_set, val_set = build_dense_datasets(root, recipe, info)
    resume = run / 'last.pth' if (run / 'last.pth').is_file() else None
    print(f'== {task}: {model} {kwargs or ""} for {recipe["steps"]} updates of batch {recipe["batch_size"]}, seed '
          f'{recipe["seed"]}' + (' (resuming)' if resume else ''), flush=True)
    start = time.perf_counter()
    trainer = Trainer(build_task(recipe, val_set), train_set, val_set, run, info, resume=resume, progress=progress)
    history = trainer.fit()
    net = trainer.model.eval()
    backbone = net.backbone.body if task == 'detection' else net.backbone
    row = dict(model=model, kwargs=kwargs, seed=recipe['seed'], updates=trainer.num_updates,
               batch_size=recipe['batch_size'], params=sum(p.numel() for p in net.parameters()),
               backbone_params=sum(p.numel() for p in backbone.parameters()),
               train_s=time.perf_counter() - start, train_img_s=_train_rate(history),
               metrics={k: v for k, v in history[-1].items() if k in METRICS}, checkpoint=str(run / 'last.pth'))
    return row, net, history


METRICS = ('bbox_AP', 'bbox_AP50', 'bbox_AP75', 'segm_AP', 'segm_AP50', 'segm_AP75', 'mIoU', 'aAcc', 'mAcc')


def run_dense_demo(output='results/dense_demo', steps: Optional[int] = None, quick: bool = False,
                   progress: bool = True, data: Optional[str] = None) -> Dict[str, Any]:
    """Train, evaluate, time and report; see the module docstring. ``quick``: the tiny dataset, a few steps."""
    from ...data import CocoInstances, SemanticMaps, make_dense_dataset
    from ...engine import init_distributed
    from ...engine.plots import plot_runs
    from ...io import atomic_write
    from .run import resolve_dense_data

    output = Path(output)
    started = time.perf_counter()
    info = init_distributed('cpu')
    if quick and data is None:
        data = output / 'data-tiny'
        make_dense_dataset(data, tiny=True)
    root = resolve_dense_data(data or 'fmnist-dense', info)
    results: Dict[str, Any] = {}
    trained: Dict[str, Dict[str, Any]] = {}
    for task in DEMO_RECIPES:
        results[task], trained[task], histories = {}, {}, {}
        for label, (model, kwargs) in DEMO_BACKBONES.items():
            overrides = {} if steps is None else dict(steps=steps)
            if quick:
                overrides.update(steps=steps or 4, batch_size=2, warmup_steps=1, eval_every=0, val_subset=4,
                                 **({'image_size': 96} if task == 'detection' else {}))
            row, net, history = train_backbone(task, model, kwargs, root, output / task / label.replace('³', '3'),
                                               info, overrides, progress)
            results[task][label], trained[task][label], histories[label] = row, (task, net), history
        plot_runs(histories, output / f'{task}_curves.png', title=f'{task}: {" vs ".join(DEMO_BACKBONES)}',
                  metric='bbox_AP' if task == 'detection' else 'mIoU')
        latency = eval_latency(trained[task], (96, 128) if quick else DEMO_SIZES, repeats=1 if quick else 3)
        for label, row in results[task].items():
            row['eval_ms'] = {str(s): latency[label].get(s) for s in DEMO_SIZES}
            row['memory'] = {} if quick else {str(s): measure_eval_memory(row['checkpoint'], task, s)
                                              for s in DEMO_SIZES}
    _draw_detections(output / 'detections.png', CocoInstances(root, 'val'), trained['detection'],
                     count=2 if quick else 4)
    _draw_segmentations(output / 'segmentations.png', SemanticMaps(root, 'val'), trained['segmentation'],
                        count=2 if quick else 4)
    meta = dict(data=str(root), threads=torch.get_num_threads(), wall_s=time.perf_counter() - started, quick=quick)
    atomic_write(output / 'results.json',
                 lambda tmp: Path(tmp).write_text(json.dumps(dict(meta=meta, results=results), indent=2) + '\n'))
    atomic_write(output / 'report.md', lambda tmp: Path(tmp).write_text(_report(results, meta)))
    print(f'dense demo: {meta["wall_s"] / 60:.1f} min -> {output / "report.md"}', flush=True)
    return dict(meta=meta, results=results)


if __name__ == '__main__':  # the memory worker: python -m vittt.tasks.dense.demo '<config JSON>'
    print(json.dumps(_memory_worker(json.loads(sys.argv[1]))))
