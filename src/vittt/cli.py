"""The ``vittt`` command: thin argument parsing over the library."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Sequence, Tuple

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
    from .models import convert_official_file
    name, count = convert_official_file(args.src, args.dst, args.model, use_ema=not args.no_ema,
                                        trust_pickle=args.trust_pickle)
    print(f'{args.src} -> {args.dst}: {name}, {count} tensors')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='vittt', description='Test-Time-Training vision backbones.')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('models', help='build models, run them at several resolutions, print params/MACs/shapes')
    p.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), metavar='NAME')
    p.add_argument('--sizes', nargs='+', type=parse_size, default=[(224, 224), (384, 640)], metavar='HxW')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--json', help='also write the table as JSON to this file')
    p.set_defaults(func=cmd_models)

    p = sub.add_parser('convert', help='convert an official ViT³/H-ViT³ checkpoint to vittt safetensors')
    p.add_argument('src', help='official .pth (plain state dict or wrapped in model / state_dict_ema)')
    p.add_argument('dst', help='output .safetensors')
    p.add_argument('--model', help='registered model name (default: detected from the checkpoint)')
    p.add_argument('--no-ema', action='store_true', help='take the non-EMA weights when both are present')
    p.add_argument('--trust-pickle', action='store_true',
                   help='allow non-tensor Python objects in the file (only for files you trust)')
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, 'debug', False):
            raise
        print(f'vittt {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
