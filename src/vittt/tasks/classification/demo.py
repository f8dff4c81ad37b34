"""The README's main job: ViT³ against its DeiT baseline on the bundled Fashion-MNIST, same recipe and budget.

Both models are small versions of the same shape (96 wide, 6 blocks, 3 heads of 32, patch 4 on 32×32 grey images,
64 tokens), trained with one recipe for the same number of epochs, evaluated on the 10,000 test images; a report
(Markdown table + curves) is written to the output folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional

__all__ = ['DEMO_RECIPE', 'DEMO_MODELS', 'run_demo']

ARCH = dict(patch_size=4, embed_dim=96, depth=6, num_heads=3)
DEMO_MODELS: Dict[str, tuple] = {
    'ViT³': ('vit3_tiny', ARCH),
    'DeiT': ('deit_tiny_patch16_224', ARCH),
}
# Small-data, few-epoch version of the papers' recipe: AdamW, linear-scaled lr with warm-up + cosine per iteration,
# wd 0.05, clipping, label smoothing; Mixup/CutMix and RandAugment off (they need hundreds of epochs to pay off).
# Budget: 2 epochs over the first 15,000 training images (a few minutes per model on 2 CPU cores); data loading
# in-process (a worker process would compete with the two compute threads).
DEMO_RECIPE = dict(epochs=2, train_subset=15000, batch_size=128, img_size=32, in_chans=1, lr=2e-3, warmup_epochs=0,
                   min_lr=1e-5, warmup_lr=1e-6, mixup=0.0, cutmix=0.0, auto_augment=None, color_jitter=None,
                   reprob=0.0, scale=[0.75, 1.0], hflip=0.5, crop_pct=1.0, label_smoothing=0.1, num_workers=0, seed=0)


def run_demo(output='results/demo', epochs: Optional[int] = None, train_subset: Optional[int] = None,
             workers: Optional[int] = None, data: str = 'fashion-mnist') -> Dict[str, Dict]:
    from .bench import count_macs, count_params
    from .data import build_datasets
    from .io import atomic_write
    from .train import Trainer, init_distributed, load_recipe
    from .train.plots import plot_runs

    output = Path(output)
    info = init_distributed('cpu')
    results, histories = {}, {}
    for label, (model_name, arch) in DEMO_MODELS.items():
        overrides = dict(DEMO_RECIPE, model=model_name, model_kwargs=arch)
        if epochs is not None:
            overrides['epochs'] = epochs
        if train_subset is not None:
            overrides['train_subset'] = train_subset
        if workers is not None:
            overrides['num_workers'] = workers
        recipe = load_recipe(None, overrides)
        train_set, val_set, num_classes = build_datasets(data, recipe)
        print(f'== {label} ({model_name}, {arch}) on {data}: {recipe["epochs"]} epochs', flush=True)
        start = time.perf_counter()
        trainer = Trainer(recipe, train_set, val_set, num_classes, output / model_name, info)
        history = trainer.fit()
        seconds = time.perf_counter() - start
        final = history[-1]
        results[label] = dict(model=model_name, arch=arch, params=count_params(trainer.model),
                              macs=count_macs(trainer.model, (recipe['in_chans'], recipe['img_size'],
                                                              recipe['img_size'])),
                              epochs=recipe['epochs'], train_seconds=seconds, top1=final['top1'],
                              top5=final['top5'], test_loss=final['val_loss'], test_images=len(trainer.val_set))
        histories[label] = history
    plot_runs(histories, output / 'curves.png', title='Fashion-MNIST: ViT³ vs DeiT, same recipe and budget')
    atomic_write(output / 'results.json', lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2) + '\n'))
    lines = ['# Fashion-MNIST demo: ViT³ vs DeiT', '',
             f'Same shape ({ARCH}), same recipe and epochs; 32×32 grey inputs; test set of '
             f'{next(iter(results.values()))["test_images"]} images. Recipe: `{json.dumps(DEMO_RECIPE)}`.', '',
             '| model | params | MACs/image | epochs | train time (s) | test top-1 (%) | top-5 (%) | test loss |',
             '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for label, r in results.items():
        lines.append(f'| {label} (`{r["model"]}`) | {r["params"] / 1e6:.2f}M | {r["macs"] / 1e6:.1f}M | {r["epochs"]} '
                     f'| {r["train_seconds"]:.0f} | {r["top1"]:.2f} | {r["top5"]:.2f} | {r["test_loss"]:.4f} |')
    lines += ['', '![curves](curves.png)', '']
    atomic_write(output / 'report.md', lambda tmp: Path(tmp).write_text('\n'.join(lines)))
    print('\n'.join(lines[4:-3]))
    print(f'report: {output / "report.md"}')
    return results
