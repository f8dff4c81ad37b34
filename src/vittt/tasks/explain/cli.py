"""``vittt explain``: argument parsing of the interpretability subcommands (the work is in :mod:`.erf`,
:mod:`.tokens`). A new subcommand is a function ``add_<name>_parser(actions)`` plus its ``cmd_<name>(args)``,
listed in :data:`SUBCOMMANDS`."""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

from ...cli import parse_setting, positive_int

__all__ = ['add_explain_parser', 'add_erf_parser', 'add_tokens_parser', 'add_inner_parser', 'cmd_erf', 'cmd_tokens',
           'cmd_inner',
           'parse_checkpoints', 'SUBCOMMANDS']


def parse_checkpoints(items: Optional[Sequence[str]], models: Sequence[str]) -> Dict[str, str]:
    """``['vit3_tiny=a.pth', ...]`` -> ``{'vit3_tiny': 'a.pth'}``; a bare path is allowed when only one model is
    given. Raises ``ValueError`` for a name not among ``models``, a name given twice or a bare path with several
    models."""
    out: Dict[str, str] = {}
    for item in items or ():
        name, sep, path = item.partition('=')
        if not sep:
            if len(models) != 1:
                raise ValueError(f'--checkpoint {item!r}: with several --models write NAME=PATH '
                                 f'(NAME one of {", ".join(models)})')
            name, path = models[0], item
        if name not in models:
            raise ValueError(f'--checkpoint {item!r}: {name!r} is not among --models ({", ".join(models)})')
        if name in out:
            raise ValueError(f'--checkpoint gives {name!r} twice')
        if not path:
            raise ValueError(f'--checkpoint {item!r}: the path is empty')
        out[name] = path
    return out


def _common_arguments(p: argparse.ArgumentParser, images: int, output: str) -> None:
    p.add_argument('--data', default='fashion-mnist',
                   help="'fashion-mnist' (default; its test split), a folder with val/ class folders, a timm dataset, "
                        "or 'noise' (standard-normal images)")
    p.add_argument('--images', type=positive_int, default=images, help=f'how many images (default {images})')
    p.add_argument('--img-size', type=positive_int,
                   help="input side (default: a checkpoint's training size, else 224)")
    p.add_argument('--batch-size', type=positive_int, default=8, help='images per backward pass (default 8)')
    p.add_argument('--seed', type=int, default=0, help='draws the images (and the weights of uninitialised models)')
    p.add_argument('--output', default=output, help=f'folder for the PNG and JSON (default {output})')


def add_erf_parser(actions) -> argparse.ArgumentParser:
    """``vittt explain erf``."""
    p = actions.add_parser('erf', help='effective receptive field of the central feature, side by side per model',
                           description='Effective receptive field (Luo et al. 2016, as measured in RepLKNet): mean '
                                       'over images of |d central output feature / d input|, with the fraction of '
                                       'the image holding 50 % / 90 % of the gradient mass. Writes erf.png, '
                                       'erf.json and erf_maps.safetensors.')
    p.add_argument('--models', nargs='+', required=True, metavar='NAME', help='timm / vittt model names')
    p.add_argument('--checkpoint', nargs='+', metavar='NAME=PATH',
                   help='weights per model (engine checkpoint, official .pth or .safetensors); models without one '
                        'are randomly initialised')
    p.add_argument('--no-relu', action='store_true',
                   help='differentiate the plain channel sum of the central feature (default: its ReLU, as '
                        'RepLKNet; the plain sum of a LayerNorm-ed feature is nearly constant)')
    _common_arguments(p, images=16, output='results/explain/erf')
    p.set_defaults(func=cmd_erf)
    return p


def add_tokens_parser(actions) -> argparse.ArgumentParser:
    """``vittt explain tokens``."""
    p = actions.add_parser('tokens', help='gradient × input token importance of the predicted class',
                           description='Per-token share of |input × d(predicted logit) / d input| for a few images, '
                                       'overlaid on them. Writes tokens.png and tokens.json.')
    p.add_argument('--models', '--model', nargs='+', required=True, metavar='NAME', help='one timm / vittt model name')
    p.add_argument('--checkpoint', metavar='PATH', help='its weights (default: random initialisation)')
    _common_arguments(p, images=8, output='results/explain/tokens')
    p.set_defaults(func=cmd_tokens)
    return p


def add_inner_parser(actions) -> argparse.ArgumentParser:
    """``vittt explain inner``."""
    p = actions.add_parser('inner', help='inner training per layer and head: loss before / after, gradient norms, '
                                         'update size',
                           description='For one image, per TTT layer and head: the inner loss before and after the '
                                       'step, the inner-gradient norm before and after the soft normalisation, and '
                                       '||W - W0|| / ||W0||. Writes inner.png and inner.json.')
    p.add_argument('--models', '--model', nargs=1, required=True, metavar='NAME', help='one vittt model name')
    p.add_argument('--checkpoint', metavar='PATH', help='its weights (default: random initialisation)')
    p.add_argument('--image', type=int, default=0, help='which of the drawn images (default 0)')
    p.add_argument('--set', nargs='+', type=parse_setting, default=[], metavar='KEY=VALUE',
                   help='design switches of a model built without checkpoint, e.g. inner_loss=mae inner_depth=3')
    _common_arguments(p, images=1, output='results/explain/inner')
    p.set_defaults(func=cmd_inner)
    return p


SUBCOMMANDS = (add_erf_parser, add_tokens_parser, add_inner_parser)


def add_explain_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``explain`` and its subcommands (:data:`SUBCOMMANDS`) to the ``vittt`` subparsers."""
    p = subparsers.add_parser('explain', help='interpretability: effective receptive fields, token importance, the '
                                              'inner training of each TTT layer')
    actions = p.add_subparsers(dest='action', required=True)
    for add in SUBCOMMANDS:
        add(actions)
    return p


def _percent(value) -> str:
    return '-' if value is None else f'{100 * value:.2f} %'


def cmd_erf(args) -> int:
    from .erf import run_erf

    checkpoints = parse_checkpoints(args.checkpoint, args.models)
    result = run_erf(args.models, output=args.output, data=args.data, images=args.images, img_size=args.img_size,
                     checkpoints=checkpoints, seed=args.seed, batch_size=args.batch_size, relu=not args.no_relu)
    lines: List[str] = [f'{"model":<26}{"50 % area":>11}{"90 % area":>11}{"square 50/90":>15}{"size":>6}{"s":>7}']
    for name, row in result['models'].items():
        sides = f'{row["square_side_50"]}/{row["square_side_90"]}'
        lines.append(f'{name:<26}{_percent(row["area_50"]):>11}{_percent(row["area_90"]):>11}{sides:>15}'
                     f'{row["img_size"]:>6}{row["seconds"]:>7.1f}')
    print('\n'.join(lines))
    print(f'area: fraction of the image\'s pixels holding that share of the gradient mass; square: side (px) of the '
          f'centred square holding it. {result["images"]} {args.data} images -> {result["png"]}, {result["json"]}')
    return 0


def cmd_tokens(args) -> int:
    from .tokens import run_tokens

    if len(args.models) != 1:
        raise ValueError(f'explain tokens takes one model, got {len(args.models)}: {", ".join(args.models)}')
    result = run_tokens(args.models[0], output=args.output, data=args.data, images=args.images,
                        img_size=args.img_size, checkpoint=args.checkpoint, seed=args.seed,
                        batch_size=args.batch_size)
    print(f'{"image":<7}{"true":<14}{"predicted":<14}{"50 % tokens":>12}{"90 % tokens":>12}{"top token":>11}')
    for i, row in enumerate(result['per_image']):
        true = '-' if row['label'] is None else (row['label_name'] or str(row['label']))
        predicted = row['predicted_name'] or str(row['predicted'])
        print(f'{i:<7}{true:<14}{predicted:<14}{_percent(row["area_50"]):>12}{_percent(row["area_90"]):>12}'
              f'{_percent(row["top_token_share"]):>11}')
    grid = 'x'.join(str(g) for g in result['grid'])
    print(f'{result["model"]}: {grid} tokens of {result["patch_size"][0]} px at {result["img_size"]} px -> '
          f'{result["png"]}, {result["json"]}')
    return 0


def cmd_inner(args) -> int:
    from .inner import STATS, run_inner

    result = run_inner(args.models[0], output=args.output, data=args.data, image=args.image, img_size=args.img_size,
                       checkpoint=args.checkpoint, seed=args.seed, model_kwargs=dict(args.set) or None)
    print(f'{"layer":<28}{"kind":<18}' + ''.join(f'{k:>22}' for k in STATS))
    for name, row in result['layers'].items():
        cells = ''.join(f'{sum(row[k]) / len(row[k]):>22.4g}' for k in STATS)
        print(f'{name:<28}{row["kind"]:<18}{cells}')
    print(f'(means over heads) {result["model"]} on {result["data"]} image {result["image"]} at {result["img_size"]}² '
          f'-> {result["png"]}, {result["json"]}')
    return 0
