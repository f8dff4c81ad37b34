"""The ``vittt`` command: thin argument parsing over the library."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence, Tuple

DEFAULT_MODELS = ('vit3_tiny', 'vit3_small', 'vit3_base', 'hvit3_tiny', 'hvit3_small', 'hvit3_base',
                  'vision_ttt_tiny', 'vision_ttt_small', 'vision_ttt_base')


def parse_size(text: str) -> Tuple[int, int]:
    """'224' -> (224, 224); '384x640' -> (384, 640) (height × width)."""
    try:
        parts = [int(p) for p in text.lower().replace('×', 'x').split('x')]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f'image size must be N or HxW with positive integers, got {text!r}')
    return parts[0], parts[1]


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
    return value


def parse_setting(text: str):
    """``KEY=VALUE`` of a model option (``--set``): ``(key, value)``, the value an int, a float, None or a string."""
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
    for parse in (int, float):
        try:
            return key, parse(value)
        except ValueError:
            pass
    return key, None if value in ('None', 'none') else value


def cmd_models(args) -> int:
    import torch
    import timm
    from .bench import count_macs, count_params

    torch.manual_seed(0)
    rows = []
    header = f'{"model":<18}{"params":>9}' + ''.join(
        f'{f"GMACs@{h}x{w}":>17}{f"logits@{h}x{w}":>18}{f"features@{h}x{w}":>22}{"ms":>8}' for h, w in args.sizes)
    print(header)
    print('-' * len(header))
    for name in args.models:
        model = timm.create_model(name).eval()
        row = {'model': name, 'params': count_params(model), 'sizes': []}
        line = f'{name:<18}{row["params"] / 1e6:>8.2f}M'
        for h, w in args.sizes:
            x = torch.randn(args.batch_size, 3, h, w)
            with torch.no_grad():
                start = time.perf_counter()
                features = model.forward_features(x)
                logits = model.forward_head(features)
                ms = (time.perf_counter() - start) * 1e3
            if features.ndim == 3:  # token output (Vision-TTT, timm-ViT style): report it as a map
                features = features.transpose(1, 2).reshape(features.shape[0], -1, -(-h // 16), -(-w // 16))
            if not torch.isfinite(logits).all():
                raise RuntimeError(f'{name} produced non-finite logits at {h}x{w}')
            macs = count_macs(model, (3, h, w))
            row['sizes'].append(dict(size=[h, w], macs=macs, logits=list(logits.shape), features=list(features.shape),
                                     ms=ms))
            line += (f'{macs / 1e9:>17.2f}{str(tuple(logits.shape)):>18}{str(tuple(features.shape)):>22}'
                     f'{ms:>8.0f}')
        print(line, flush=True)
        rows.append(row)
    print(f'\nMACs: matmuls and convolutions incl. the TTT inner loop (torch FlopCounterMode); ms: one eager '
          f'forward, batch {args.batch_size}, {torch.get_num_threads()} threads, not a benchmark.')
    if args.json:
        from .io import atomic_write
        atomic_write(args.json, lambda tmp: open(tmp, 'w').write(json.dumps(rows, indent=2)))
        print(f'wrote {args.json}')
    return 0


def cmd_convert(args) -> int:
    from .dense.convert import convert_dense_file, format_inspection, inspect_checkpoint
    from .models import convert_official_file
    if args.inspect:
        print(format_inspection(inspect_checkpoint(args.src, trust_pickle=args.trust_pickle)))
        return 0
    if args.dst is None:
        raise ValueError('give SRC and DST (or --inspect SRC)')
    report = convert_dense_file(args.src, args.dst, args.task, args.model, trust_pickle=args.trust_pickle)
    if report is not None:  # a detection / segmentation / backbone file
        classes = f', {report["num_classes"]} classes' if report.get('num_classes') is not None else ''
        dropped = f' ({len(report["dropped"])} dropped)' if report['dropped'] else ''
        print(f'{args.src} -> {args.dst}: {report["task"]} on {report["model"]}{classes}, '
              f'{report["num_tensors"]} tensors{dropped}')
        return 0
    name, count = convert_official_file(args.src, args.dst, args.model, use_ema=not args.no_ema,
                                        trust_pickle=args.trust_pickle)
    print(f'{args.src} -> {args.dst}: {name}, {count} tensors')
    return 0


def _recipe_from_args(args, notes):
    from .engine import find_recipe, load_recipe, parse_overrides

    overrides = parse_overrides(args.overrides)
    for key, value in (('model', args.model), ('epochs', args.epochs), ('img_size', args.img_size),
                       ('batch_size', args.batch_size), ('lr', args.lr), ('num_workers', args.workers)):
        if value is not None:
            overrides[key] = value
    task = overrides.get('task', 'classification')
    source = args.recipe if args.recipe is not None else find_recipe(args.model, task)
    return load_recipe(source, overrides, notes), source


def cmd_recipes(args) -> int:
    import yaml
    from .engine import list_recipes

    rows = []
    for name, resource in list_recipes().items():
        data = yaml.safe_load(resource.read_text()) or {}
        length = f'{data["steps"]} steps' if data.get('steps') else f'{data.get("epochs", "-")} epochs'
        rows.append((name, data.get('task', 'classification'), str(data.get('model') or '(any)'), length,
                     ' '.join(f'{k}={v}' for k, v in data.items() if k not in ('task', 'model', 'epochs', 'steps'))))
    widths = [max(len(r[i]) for r in rows + [('recipe', 'task', 'model', 'length', '')]) for i in range(4)]
    print('  '.join(h.ljust(w) for h, w in zip(('recipe', 'task', 'model', 'length'), widths)) + '  settings')
    for r in rows:
        settings = r[4] if len(r[4]) <= 70 else r[4][:67] + '...'
        print('  '.join(c.ljust(w) for c, w in zip(r, widths)) + '  ' + settings)
    print('\nvittt train --model M picks the recipe of M; --recipe NAME|FILE another; --print-recipe shows the result.')
    return 0


def _start_training(args, command: str):
    """The resolved recipe and the process group of a training command, or None after --print-recipe."""
    from .engine import init_distributed, recipe_yaml

    notes = []
    recipe, source = _recipe_from_args(args, notes)
    if args.print_recipe:
        print(f'# recipe {source or "defaults"} with overrides, resolved', *(f'# {n}' for n in notes), sep='\n')
        print(recipe_yaml(recipe), end='')
        return None
    if args.data is None or args.output is None or recipe['model'] is None:
        raise ValueError('--model (unless the recipe names one), --data and --output are required (except with '
                         '--print-recipe)')
    info = init_distributed(args.device)
    if info.is_main:
        print(f'{command}: {recipe["model"]} ({recipe["task"]}) on {args.data} -> {args.output} '
              f'(recipe {source or "defaults"}, {info.world_size} process(es), {info.device})', flush=True)
        for note in notes:
            print(f'{command}: {note}', flush=True)
    return recipe, info


def cmd_train(args) -> int:
    started = _start_training(args, 'vittt train')
    if started is None:
        return 0
    recipe, info = started
    if recipe['task'] != 'classification':
        raise ValueError(f'vittt train runs classification recipes; this one is a {recipe["task"]!r} recipe '
                         f'(vittt generate train runs generation recipes)')
    from .tasks.classification import train
    train(recipe, args.data, args.output, info, resume=args.resume, progress=not args.no_progress)
    return 0


def cmd_eval(args) -> int:
    from .engine import init_distributed
    from .tasks.classification import evaluate_checkpoint

    info = init_distributed(args.device)
    result = evaluate_checkpoint(args.model, args.checkpoint, args.data, info, img_size=args.img_size,
                                 crop_pct=args.crop_pct, batch_size=args.batch_size, workers=args.workers,
                                 subset=args.subset, use_ema=not args.no_ema, output=args.output)
    if info.is_main:
        print(f'top1 {result["top1"]:.2f}  top5 {result["top5"]:.2f}  loss {result["loss"]:.4f}  '
              f'({result["count"]} images, {result["img_size"]}px) -> {result["output"]}')
    return 0


def cmd_demo(args) -> int:
    from .tasks.classification.demo import run_demo
    run_demo(args.output, epochs=args.epochs, train_subset=args.train_subset, workers=args.workers)
    return 0


def cmd_generate(args) -> int:
    if args.action == 'train':
        args.overrides = ['task=generation', *args.overrides]
        if args.steps is not None:
            args.overrides.append(f'steps={args.steps}')
        if args.vae is not None:
            args.overrides.append(f'vae={json.dumps(str(args.vae))}')
        started = _start_training(args, 'vittt generate train')
        if started is None:
            return 0
        recipe, info = started
        if recipe['task'] != 'generation':
            raise ValueError(f'vittt generate train runs generation recipes; this one is a {recipe["task"]!r} recipe')
        from .tasks.generation import train
        train(recipe, args.data, args.output, info, resume=args.resume, progress=not args.no_progress)
        return 0
    if args.action == 'demo':
        from .tasks.generation.demo import run_generation_demo
        run_generation_demo(args.output, steps=args.steps, samples=args.samples, sampler=args.sampler,
                            quick=args.quick, progress=not args.no_progress)
        return 0
    if args.action == 'cache':
        from .tasks.generation.latents import write_latent_cache
        meta = write_latent_cache(args.vae, args.data, args.output, image_size=args.image_size,
                                  batch_size=args.batch_size, flips=not args.no_flip,
                                  dtype='float16' if args.fp16 else 'float32', device=args.device or 'cpu',
                                  progress=not args.no_progress)
        print(f'latent cache of {args.data} ({", ".join(f"{k} {v}" for k, v in meta["splits"].items())} images, '
              f'{meta["latent_channels"]}×{meta["latent_side"]}² latents, VAE {meta["vae_sha256"]}) -> {args.output}; '
              f'train on it with --data {args.output} --vae {args.vae}')
        return 0
    if args.action == 'eval':
        from .tasks.generation.run import evaluate_checkpoint
        result = evaluate_checkpoint(args.checkpoint, samples=args.samples, cfg_scales=args.cfg_scale,
                                     sampler=args.sampler, seed=args.seed, fid_weights=args.fid_weights,
                                     reference=args.reference, use_ema=not args.no_ema, vae=args.vae,
                                     device=args.device or 'cpu', output=args.output, batch_size=args.batch_size)
        print(f'{args.checkpoint} (step {result["step"]}, {result["weights"]} weights): {args.samples} samples per '
              f'scale, {args.sampler}, seed {args.seed}')
        if 'fd_fmnist_floor' in result:
            print(f'FD-FMNIST noise floor ({args.samples} real training images): {result["fd_fmnist_floor"]:.2f}')
        for row in result['rows']:
            print(f'  cfg {row["cfg_scale"]:g}: ' + ', '.join(
                f'{key} {row[key]:.3f}' for key in ('fd_fmnist', 'label_agreement', 'classifier_score',
                                                    'inception_fid') if key in row))
        print(f'-> {result["output"]}')
        return 0
    from .tasks.generation import sample_checkpoint
    per_row = args.labels if args.labels else list(range(10))
    labels = [y for _ in range(args.per_label) for y in per_row]  # one row per repeat, one column per label
    sample_checkpoint(args.checkpoint, labels, args.out, cfg_scale=args.cfg_scale, sampler=args.sampler,
                      seed=args.seed, image_size=args.image_size, npz=args.npz, use_ema=not args.no_ema, vae=args.vae,
                      device=args.device or 'cpu', nrow=len(per_row), batch_size=args.batch_size)
    print(f'{len(labels)} samples ({args.sampler}, cfg {args.cfg_scale}) -> {args.out}'
          + (f' and {args.npz}' if args.npz else ''))
    return 0


def cmd_dense(args) -> int:
    if args.action == 'train':
        task = {'det': 'detection', 'seg': 'segmentation'}[args.task]
        args.overrides = [f'task={task}', *args.overrides]
        if args.steps is not None:
            args.overrides.append(f'steps={args.steps}')
        if args.recipe is None:
            args.recipe = f'dense_cpu_{task}'
        started = _start_training(args, 'vittt dense train')
        if started is None:
            return 0
        recipe, info = started
        if recipe['task'] != task:
            raise ValueError(f'--task {args.task} runs {task} recipes; this one is a {recipe["task"]!r} recipe')
        from .tasks.dense.run import train
        train(recipe, args.data, args.output, info, resume=args.resume, progress=not args.no_progress)
        return 0
    if args.action == 'eval':
        from .engine import init_distributed
        from .tasks.dense.run import evaluate_checkpoint
        info = init_distributed(args.device)
        result = evaluate_checkpoint(args.checkpoint, args.data, info, split=args.split, output=args.output,
                                     use_ema=not args.no_ema, batch_size=args.batch_size, subset=args.subset)
        if info.is_main:
            seg = result['task'] == 'segmentation'
            shown = {k: v for k, v in result['metrics'].items()
                     if isinstance(v, float) and (seg or k.endswith(('AP', 'AP50', 'AP75')))}
            print(f'{result["model"]} {result["task"]} on {result["images"]} {args.split} images: '
                  + ', '.join(f'{k} {v:.2f}' for k, v in shown.items()) + f' -> {result["output"]}')
        return 0
    from .tasks.dense.demo import run_dense_demo
    run_dense_demo(args.output, steps=args.steps, quick=args.quick, progress=not args.no_progress)
    return 0


def cmd_data(args) -> int:
    from .data import run_make_dense
    return run_make_dense(args)


def cmd_bench(args) -> int:
    from .bench import BenchSettings, render_markdown, run_bench, write_outputs

    settings = BenchSettings(
        models=args.models, sizes=args.sizes, modes=args.mode, dtypes=args.dtype, batch_size=args.batch_size,
        threads=args.threads, repeats=args.repeats, warmup=args.warmup, attn=args.attn, lean=args.lean,
        compile=args.compile, ort='ort' in args.backend, official=args.official,
        baseline=args.baseline, device=args.device, memory=not args.no_memory,
        memory_repeats=args.memory_repeats, timing=not args.no_time,
        train_sizes=args.train_sizes, train_batch_size=args.train_batch_size)
    result = run_bench(settings, command=args.command_line)
    paths = write_outputs(result, args.output)
    print(render_markdown(result))
    print(f'wrote {", ".join(str(p) for p in paths.values())}')
    return 0


def _add_run_arguments(p, model: str, data: str, recipe: str, output: str = 'run folder: checkpoints, metrics, curves',
                       lengths=('epochs',)) -> None:
    """The arguments every training command shares (``vittt train``, ``generate train``, ``dense train``)."""
    p.add_argument('--model', help=model)
    p.add_argument('--data', help=data)
    p.add_argument('--output', help=output)
    p.add_argument('--recipe', help=recipe)
    p.add_argument('--print-recipe', action='store_true', help='print the resolved recipe and exit')
    if 'epochs' in lengths:
        p.add_argument('--epochs', type=int)
    if 'steps' in lengths:
        p.add_argument('--steps', type=int, help='optimizer updates')
    p.add_argument('--batch-size', type=int, help='per process')
    p.add_argument('--lr', type=float, help='base lr per lr_base_batch images (scaled by the global batch; no scaling '
                                            'when lr_base_batch is null)')
    p.add_argument('--workers', type=int, help='data-loading processes per training process')
    p.add_argument('--resume', help='continue a run from its checkpoint (last.pth)')
    p.add_argument('--device', help='cpu, cuda, cuda:1 ... (default: the local GPU if any)')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('overrides', nargs='*', metavar='key=value', help='override any recipe field')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='vittt', description='Test-Time-Training vision backbones.')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('models', help='build models, run them at several resolutions, print params/MACs/shapes')
    p.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), metavar='NAME')
    p.add_argument('--sizes', nargs='+', type=parse_size, default=[(224, 224), (384, 640)], metavar='HxW')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--json', help='also write the table as JSON to this file')
    p.set_defaults(func=cmd_models)

    p = sub.add_parser('convert', help='convert an official ViT³/H-ViT³ (classification, Mask R-CNN, UPerNet) '
                                       'checkpoint to vittt safetensors')
    p.add_argument('src', help='official .pth (plain state dict or wrapped in model / state_dict_ema)')
    p.add_argument('dst', nargs='?', help='output .safetensors')
    p.add_argument('--task', choices=['classification', 'maskrcnn', 'fasterrcnn', 'upernet', 'backbone'],
                   help='what to convert into (default: detected from the checkpoint; backbone: only the '
                        'DenseBackbone of a detection / segmentation / classification file)')
    p.add_argument('--inspect', action='store_true', help='print the task, variant, classes and key groups of SRC')
    p.add_argument('--model', help='registered model name (default: detected from the checkpoint)')
    p.add_argument('--no-ema', action='store_true', help='take the non-EMA weights when both are present')
    p.add_argument('--trust-pickle', action='store_true',
                   help='allow non-tensor Python objects in the file (only for files you trust)')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser('recipes', help='list the recipes shipped in the package')
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser('train', help='train a model (ours or timm\'s) with the papers\' recipe; works under torchrun')
    _add_run_arguments(p, model='timm model name (default: the recipe\'s)',
                       data="'fashion-mnist', a folder with train/ and val/ class folders, or a timm dataset name",
                       recipe='a shipped recipe name (vittt recipes) or a YAML file (default: the shipped recipe of '
                              '--model when there is one, else the defaults)')
    p.add_argument('--img-size', type=int)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser('eval', help='top-1/top-5/loss of a checkpoint or (converted) official weights on a dataset')
    p.add_argument('--model', required=True)
    p.add_argument('--checkpoint', required=True, help='training checkpoint, official .pth, or .safetensors')
    p.add_argument('--data', required=True)
    p.add_argument('--img-size', type=int, help='evaluation resolution (default: the training size of a vittt '
                                                'checkpoint, else 224)')
    p.add_argument('--crop-pct', type=float, help='resize to img_size / crop_pct, then centre crop (default 0.875)')
    p.add_argument('--batch-size', type=int, default=100)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--subset', type=int, help='only the first N images')
    p.add_argument('--no-ema', action='store_true', help='use the raw weights even when EMA weights exist')
    p.add_argument('--device')
    p.add_argument('--output', help='metrics JSON (default: next to the checkpoint, <name>.eval.json)')
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser('bench', help='latency, throughput and peak memory vs resolution, against a baseline',
                       description='Benchmark models (timm names or DiT names such as dit3_b_2 / dit_b_2, '
                                   'optionally name:key=value,...) at several image resolutions (a DiT runs on the '
                                   '4-channel SD-VAE latent of that image, size / 8): interleaved timing, peak '
                                   'memory per step in fresh processes, MACs, speed-up and memory ratio vs a '
                                   'baseline, crossover resolution. Writes bench.json, '
                                   'bench.md and bench.png.')
    p.add_argument('--models', nargs='+', default=['vit3_tiny', 'deit_tiny_patch16_224'], metavar='SPEC',
                   help="timm model names, optionally with kwargs: 'vit3_tiny:depth=2,embed_dim=64'")
    p.add_argument('--sizes', nargs='+', type=parse_size, default=[(224, 224), (448, 448), (640, 640)],
                   metavar='HxW')
    p.add_argument('--mode', nargs='+', choices=['infer', 'train'], default=['infer'],
                   help='infer: forward under inference_mode; train: forward, cross-entropy (a DiT: mean square of '
                        'its output), backward')
    p.add_argument('--dtype', nargs='+', choices=['fp32', 'bf16'], default=['fp32'],
                   help='bf16: bfloat16 weights for infer, autocast over fp32 weights for train')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--train-sizes', nargs='+', type=parse_size, metavar='HxW',
                   help='sizes of the train mode (default: --sizes)')
    p.add_argument('--train-batch-size', type=int, help='batch of the train mode (default: --batch-size)')
    p.add_argument('--threads', type=int, help="torch threads (default: torch's default)")
    p.add_argument('--repeats', type=int, default=7, help='timed rounds (every variant once per round)')
    p.add_argument('--warmup', type=int, default=2, help='untimed calls per variant first')
    p.add_argument('--attn', nargs='+', choices=['fused', 'math'], default=['fused'],
                   help='for models with timm attention: fused (scaled_dot_product_attention) and/or math '
                        '(explicit softmax(QK^T)V, a <spec>+math variant)')
    p.add_argument('--lean', action='store_true',
                   help='add a <spec>+lean variant (memory-lean inference) for models that have that mode')
    p.add_argument('--compile', action='store_true',
                   help='add a <spec>+compile variant (torch.compile, static shapes) of every model; compiled in '
                        'its warm-up calls (at least one), CPU memory not measured (compilation would be in it)')
    p.add_argument('--backend', nargs='+', choices=['eager', 'ort'], default=['eager'],
                   help='ort: add a <spec>+ort variant of every model, exported to ONNX (vittt export, one file '
                        'per vittt model with a dynamic batch and resolution; per resolution for fixed-size models) '
                        'and timed in onnxruntime with the same threads (fp32 '
                        'inference on the CPU; export time not timed, memory not measured)')
    p.add_argument('--official', metavar='PATH',
                   help='a checkout of LeapLabTHU/ViTTT (or its ttt_block.py): add a <spec>+official variant of every '
                        'ViT³ / H-ViT³ model, the official TTT block in place of vittt\'s mixer with the same '
                        'weights (checked to agree), to time it in the same run')
    p.add_argument('--baseline', metavar='LABEL',
                   help='variant to compare against (default: the first deit* variant, else the first attention '
                        'DiT (dit_*), else the first)')
    p.add_argument('--device', default='cpu', help='cpu or cuda (cuda:N)')
    p.add_argument('--no-memory', action='store_true', help='skip peak-memory measurement')
    p.add_argument('--memory-repeats', type=int, default=1, metavar='N',
                   help='CPU memory: measure each configuration in N fresh processes and keep the median reading '
                        '(RSS moves by tens of MiB between processes)')
    p.add_argument('--no-time', action='store_true', help='skip timing (memory only)')
    p.add_argument('--output', default='results/bench', help='folder for bench.json, bench.md, bench.png')
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser('dense', help='detection / instance / semantic segmentation: train (on the engine), eval, demo')
    dense = p.add_subparsers(dest='action', required=True)
    g = dense.add_parser('train', help='train a torchvision detector or an smp UPerNet over a vittt / timm backbone')
    g.add_argument('--task', choices=('det', 'seg'), required=True, help='det: Mask R-CNN & co.; seg: UPerNet')
    _add_run_arguments(g, model='backbone: any timm model name (default: the recipe\'s)',
                       data="'fmnist-dense' (generated once), a `vittt data make-dense` folder, COCO 2017 (det) or "
                            "ADE20K (seg)",
                       recipe='a shipped recipe (vittt recipes; default dense_cpu_detection / dense_cpu_segmentation) '
                              'or a YAML file', lengths=('epochs', 'steps'))
    g.set_defaults(func=cmd_dense, img_size=None)
    g = dense.add_parser('eval', help='COCO box / mask AP or mIoU of a vittt dense train checkpoint')
    g.add_argument('--checkpoint', required=True, help='last.pth / best.pth of vittt dense train')
    g.add_argument('--data', default='fmnist-dense')
    g.add_argument('--split', default='val')
    g.add_argument('--output', help='metrics JSON (default: <checkpoint>.dense-eval.json)')
    g.add_argument('--batch-size', type=int)
    g.add_argument('--subset', type=int, default=0, help='only the first N images (0: all)')
    g.add_argument('--no-ema', action='store_true', help='the raw weights even when the run kept an EMA')
    g.add_argument('--device')
    g.set_defaults(func=cmd_dense)
    g = dense.add_parser('demo', help='H-ViT³ vs an attention backbone under the same detector and segmenter')
    g.add_argument('--output', default='results/dense_demo')
    g.add_argument('--steps', type=int, help='training updates per model and task (default: the demo recipe)')
    g.add_argument('--quick', action='store_true', help='a minute-long smoke run on the tiny dataset')
    g.add_argument('--no-progress', action='store_true')
    g.set_defaults(func=cmd_dense)

    p = sub.add_parser('data', help='datasets: make-dense writes the offline COCO-format detection / segmentation set')
    data = p.add_subparsers(dest='action', required=True)
    g = data.add_parser('make-dense', help='COCO-format instances + PNG semantic maps from Fashion-MNIST objects')
    from .data import add_make_dense_arguments
    add_make_dense_arguments(g)
    g.set_defaults(func=cmd_data)

    p = sub.add_parser('generate', help='DiT³ / DiT image generation: train (on the engine), sample, evaluate, demo')
    gen = p.add_subparsers(dest='action', required=True)
    g = gen.add_parser('train', help='train a DiT³ / DiT (step-based, the official recipe by default)')
    _add_run_arguments(g, model='dit3_{s,b,l,xl}_{2,4,8} or dit_* (or DiTTT-B/2, DiT-B/2)',
                       data="'fashion-mnist' (pixel space, 32×32) or a folder with train/ (val/) classes",
                       recipe='a shipped recipe name (vittt recipes) or a YAML file',
                       output='run folder: checkpoints, metrics, curves, samples/', lengths=('steps',))
    g.add_argument('--vae', help='local AutoencoderKL folder: train in its latent space (default: pixel space)')
    g.set_defaults(func=cmd_generate, epochs=None, img_size=None)
    g = gen.add_parser('sample', help='samples of a generation checkpoint as a PNG grid (and an ADM .npz)')
    g.add_argument('--checkpoint', required=True, help='last.pth / best.pth of vittt generate train')
    g.add_argument('--labels', type=int, nargs='*', help='class labels (default 0..9)')
    g.add_argument('--per-label', type=int, default=1, help='samples per label (grid rows)')
    g.add_argument('--cfg-scale', type=float, default=4.0, help='classifier-free guidance scale (1 = none)')
    g.add_argument('--sampler', default='ddpm250', help='ddpm250 (official), ddimN, dpm++N')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--image-size', type=int, help='default: the training size (any multiple of the patch works)')
    g.add_argument('--out', required=True, help='PNG grid')
    g.add_argument('--npz', help='also write the samples as arr_0 NHWC uint8 (the ADM evaluator layout)')
    g.add_argument('--batch-size', type=int, help='sample in chunks of this many (chunk i seeded by (seed, i); '
                                                  'default: one batch)')
    g.add_argument('--vae', help='VAE folder (default: the one the run trained with)')
    g.add_argument('--no-ema', action='store_true', help='the raw weights instead of the EMA')
    g.add_argument('--device')
    g.set_defaults(func=cmd_generate)
    g = gen.add_parser('cache', help='encode a dataset once with the VAE (a latent cache to train on)')
    g.add_argument('--vae', required=True, help='local AutoencoderKL folder')
    g.add_argument('--data', required=True, help="a folder with train/ (val/) class folders, or 'fashion-mnist'")
    g.add_argument('--output', required=True, help='cache folder (then: generate train --data <it> --vae <vae>)')
    g.add_argument('--image-size', type=int, default=256, help='ADM centre crop to this size before encoding')
    g.add_argument('--batch-size', type=int, default=32)
    g.add_argument('--no-flip', action='store_true', help='do not also encode mirrored images (then train hflip=0)')
    g.add_argument('--fp16', action='store_true', help='store float16 (half the disk; not bit-exact to encoding)')
    g.add_argument('--device')
    g.add_argument('--no-progress', action='store_true')
    g.set_defaults(func=cmd_generate)
    g = gen.add_parser('eval', help='score a generation checkpoint: FD-FMNIST (+ floor), label agreement, '
                                    'classifier score; Inception FID with local weights')
    g.add_argument('--checkpoint', required=True, help='last.pth / best.pth of vittt generate train')
    g.add_argument('--samples', type=int, default=1000, help='samples per guidance scale (labels balanced)')
    g.add_argument('--cfg-scale', type=float, nargs='+', default=[1.0, 3.0], help='guidance scales (1 = none)')
    g.add_argument('--sampler', default='ddim25', help='ddpm250 (official), ddimN, dpm++N')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--fid-weights', help='local Inception-v3 file for the standard FID (torch-fidelity\'s '
                                         'pt_inception-2015-12-05-6726825d.pth; needs vittt[fid])')
    g.add_argument('--reference', help="real images for Inception FID: 'fashion-mnist', a folder, or an ADM .npz "
                                       "(default for Fashion-MNIST models: its test split)")
    g.add_argument('--vae', help='VAE folder (default: the one the run trained with)')
    g.add_argument('--no-ema', action='store_true', help='the raw weights instead of the EMA')
    g.add_argument('--device')
    g.add_argument('--output', help='metrics JSON (default: <checkpoint>.gen-eval.json)')
    g.add_argument('--batch-size', type=int, default=100, help='samples per chunk (chunk i seeded by (seed, i))')
    g.set_defaults(func=cmd_generate)
    g = gen.add_parser('demo', help='Fashion-MNIST: pixel-space DiT³ vs DiT, same recipe and budget, with a report')
    g.add_argument('--output', default='results/generate_demo')
    g.add_argument('--steps', type=int, help='training steps per model (default: the recipe\'s)')
    g.add_argument('--samples', type=int, default=1000, help='samples per model and guidance scale for the metrics')
    g.add_argument('--sampler', default='ddim25')
    g.add_argument('--quick', action='store_true', help='a smoke run: 3 steps, 20 samples, 2 sampler steps')
    g.add_argument('--no-progress', action='store_true')
    g.set_defaults(func=cmd_generate)

    from .tasks.explain.cli import add_explain_parser
    add_explain_parser(sub)  # vittt explain erf / tokens (their cmd_* functions are set on the subparsers)

    from .tasks.ablate.cli import add_ablate_parser
    add_ablate_parser(sub)  # vittt ablate --table N (cmd_ablate is set on the subparser)

    from .tasks.export.cli import add_export_parser
    add_export_parser(sub)  # vittt export MODEL OUT.onnx|OUT.pt2 (cmd_export is set on the subparser)

    p = sub.add_parser('demo', help='Fashion-MNIST: ViT³ vs DeiT at equal recipe and budget, with a report')
    p.add_argument('--output', default='results/demo')
    p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--train-subset', type=int, default=None)
    p.add_argument('--workers', type=int, default=None)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = list(sys.argv) if argv is None else ['vittt', *argv]
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        if getattr(args, 'debug', False):
            raise
        print(f'vittt {args.command}: error: {e}', file=sys.stderr)
        return 2
    finally:
        from .engine import shutdown_distributed
        shutdown_distributed()  # (under torchrun; a no-op otherwise)


if __name__ == '__main__':
    sys.exit(main())
