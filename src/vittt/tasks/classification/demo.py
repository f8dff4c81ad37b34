"""The README's main job: ViT³ against its DeiT baseline on the bundled Fashion-MNIST, same recipe and budget.

Both models have the same shape (``model_kwargs`` of the shipped recipe ``fashion_mnist_demo``: patch 7 on 28×28
grey images, 16 tokens), are trained with that one recipe for the same number of epochs and evaluated on the 10,000
test images; the report (Markdown table, per-epoch accuracy, curves) is written to the output folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional

__all__ = ['DEMO_RECIPE', 'DEMO_MODELS', 'run_demo']

DEMO_RECIPE = 'fashion_mnist_demo'
DEMO_MODELS: Dict[str, str] = {'ViT³': 'vit3_tiny', 'DeiT': 'deit_tiny_patch16_224'}


def run_demo(output='results/demo', epochs: Optional[int] = None, train_subset: Optional[int] = None,
             workers: Optional[int] = None, data: str = 'fashion-mnist', val_subset: Optional[int] = None,
             progress: bool = True) -> Dict[str, Dict]:
    from ...bench import count_macs, count_params
    from ...data import build_datasets
    from ...engine import Trainer, init_distributed, load_recipe
    from ...engine.plots import plot_runs
    from ...io import atomic_write
    from .task import ClassificationTask

    output = Path(output)
    info = init_distributed('cpu')
    results, histories, notes = {}, {}, []
    overrides = {k: v for k, v in dict(epochs=epochs, train_subset=train_subset, num_workers=workers,
                                       val_subset=val_subset).items() if v is not None}
    started = time.perf_counter()
    for label, model_name in DEMO_MODELS.items():
        recipe = load_recipe(DEMO_RECIPE, dict(overrides, model=model_name), notes if not results else None)
        train_set, val_set, num_classes = build_datasets(data, recipe)
        print(f'== {label} ({model_name}, {recipe["model_kwargs"]}) on {data}: {recipe["epochs"]} epoch(s) over '
              f'{min(len(train_set), recipe["train_subset"] or len(train_set))} images', flush=True)
        for note in notes if not results else ():
            print(f'   {note}', flush=True)
        start = time.perf_counter()
        trainer = Trainer(ClassificationTask(recipe, num_classes), train_set, val_set, output / model_name, info,
                          progress=progress)
        history = trainer.fit()
        seconds = time.perf_counter() - start
        final = history[-1]
        size = (recipe['in_chans'], recipe['img_size'], recipe['img_size'])
        results[label] = dict(model=model_name, arch=recipe['model_kwargs'], params=count_params(trainer.model),
                              macs=count_macs(trainer.model, size), epochs=recipe['epochs'],
                              train_images=len(trainer.train_set), updates=trainer.num_updates,
                              train_seconds=seconds, top1=final['top1'], top5=final['top5'],
                              test_loss=final['val_loss'], test_images=len(trainer.val_set),
                              top1_per_epoch=[r['top1'] for r in history if 'top1' in r])
        histories[label] = history
    total = time.perf_counter() - started
    plot_runs(histories, output / 'curves.png', title='Fashion-MNIST: ViT³ vs DeiT, same recipe and budget')
    atomic_write(output / 'results.json', lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + '\n'))
    report = _report(results, recipe, total)
    atomic_write(output / 'report.md', lambda tmp: Path(tmp).write_text(report))
    print(report)
    print(f'report: {output / "report.md"}')
    return results


def _report(results: Dict[str, Dict], recipe: Dict, total_seconds: float) -> str:
    from ...engine import recipe_yaml

    first = next(iter(results.values()))
    vit3, deit = results.get('ViT³'), results.get('DeiT')
    lines = ['# Fashion-MNIST demo: ViT³ vs DeiT, same shape, recipe and budget', '',
             f'**What was trained.** Two classifiers of the same shape (`{json.dumps(first["arch"])}`: '
             f'{recipe["img_size"]}×{recipe["img_size"]} grey images, patch {first["arch"].get("patch_size")}), one '
             f'with TTT token mixing (ViT³), one with softmax attention (DeiT), trained from scratch with the shipped '
             f'recipe `{DEMO_RECIPE}` for {first["epochs"]} epoch(s) over {first["train_images"]:,} training images '
             f'({first["updates"]} updates of batch {recipe["batch_size"]}) and evaluated on the '
             f'{first["test_images"]:,} test images. Both runs took {total_seconds / 60:.1f} minutes in all on this '
             f'machine.', '',
             '| model | params | MACs/image | epochs | updates | train time | test top-1 (%) | top-5 (%) | test loss |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for label, r in results.items():
        lines.append(f'| {label} (`{r["model"]}`) | {r["params"] / 1e6:.2f}M | {r["macs"] / 1e6:.1f}M | {r["epochs"]} '
                     f'| {r["updates"]} | {r["train_seconds"] / 60:.1f} min | **{r["top1"]:.2f}** | {r["top5"]:.2f} '
                     f'| {r["test_loss"]:.4f} |')
    lines += ['', 'Test top-1 after each epoch: ' + '; '.join(
        f'{label} ' + ' → '.join(f'{a:.2f}' for a in r['top1_per_epoch']) for label, r in results.items()) + '.']
    if vit3 and deit:
        gap = vit3['top1'] - deit['top1']
        lines += ['', f'**How they did.** ViT³ reached {vit3["top1"]:.2f} % test top-1, DeiT {deit["top1"]:.2f} % '
                  f'({"+" if gap >= 0 else ""}{gap:.2f} points for ViT³), with ViT³ taking '
                  f'{vit3["train_seconds"] / deit["train_seconds"]:.2f}× DeiT\'s training time. The budget is small: '
                  f'both would gain from longer training.']
    lines += ['', '![curves](curves.png)', '',
              f'`vittt train --recipe {DEMO_RECIPE} --model vit3_tiny --data fashion-mnist --output runs/demo` '
              f'reproduces one run. The resolved recipe:', '', '```yaml',
              recipe_yaml({k: v for k, v in recipe.items() if k != 'model'}).rstrip(), '```', '']
    return '\n'.join(lines)
