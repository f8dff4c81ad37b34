"""``vittt export MODEL OUT.onnx|OUT.pt2``: argument parsing (the work is in :mod:`.core`)."""
from __future__ import annotations

import argparse
import json

__all__ = ['add_export_parser', 'cmd_export']


def _dynamic(text: str):
    from .core import DYNAMIC_AXES
    if text.strip().lower() in ('', 'none'):
        return ()
    axes = tuple(a.strip() for a in text.split(',') if a.strip())
    bad = [a for a in axes if a not in DYNAMIC_AXES]
    if bad:
        raise argparse.ArgumentTypeError(f'--dynamic takes a comma-separated subset of {",".join(DYNAMIC_AXES)} (or '
                                         f'none), got {text!r}')
    return axes


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    from ...cli import parse_setting, parse_size, positive_int

    p = subparsers.add_parser(
        'export', help='a model to ONNX (.onnx) or torch.export (.pt2), dynamic batch and resolution, verified',
        description='Export a registered model (classification head, its features_only backbone with '
                    '--features-only, or a DiT³ / DiT generator with its (x, t, y) inputs) to ONNX (run in '
                    'onnxruntime for the check) or a torch.export program, with a dynamic batch size and resolution. '
                    'The written file is run at several batch sizes and resolutions (non-square, sides not multiples '
                    'of the stride) and compared with eager PyTorch; a file that disagrees beyond --tolerance is '
                    'not kept (exit status 2). docs/export.md lists what works for which family.')
    p.add_argument('model', help='a timm / vittt model name (vit3_tiny, hvit3_small, vision_ttt_base, '
                                 'deit_tiny_patch16_224, ...) or a DiT name (dit3_b_2, DiTTT-B/2, dit_s_2)')
    p.add_argument('output', help='OUT.onnx or OUT.pt2 (written only if the checks pass)')
    p.add_argument('--checkpoint', help='weights: an engine training checkpoint, an official .pth or a converted '
                                        '.safetensors (default: random initialisation)')
    p.add_argument('--features-only', action='store_true',
                   help='export the features_only backbone (the feature maps at the default taps) instead')
    p.add_argument('--dynamic', type=_dynamic, default=('batch', 'height', 'width'),
                   help='dynamic axes: a comma-separated subset of batch,height,width, or none '
                        '(default batch,height,width)')
    p.add_argument('--min-size', type=positive_int, help='smallest input side of a dynamic resolution (default: twice '
                                                      "the model's stride, the smallest that exports)")
    p.add_argument('--max-size', type=positive_int, help='largest input side of a dynamic resolution (default 4096)')
    p.add_argument('--example-size', type=parse_size,
                   help='input size traced (N or HxW; default the model\'s nominal size) and checked')
    p.add_argument('--opset', type=positive_int, help='ONNX opset (default: torch.onnx\'s)')
    p.add_argument('--tolerance', type=float, default=1e-4,
                   help='largest allowed |exported − eager| over max(1, max |eager output|) (default 1e-4)')
    p.add_argument('--json', help='also write the checks as JSON here')
    p.add_argument('--set', nargs='+', type=parse_setting, default=[], metavar='KEY=VALUE',
                   help='model options for timm.create_model / create_dit, e.g. --set depth=2 embed_dim=64')
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    from .core import export_model

    result = export_model(args.model, args.output, checkpoint=args.checkpoint, features_only=args.features_only,
                          dynamic=args.dynamic, min_size=args.min_size, max_size=args.max_size, opset=args.opset,
                          tolerance=args.tolerance, example_size=args.example_size,
                          model_kwargs=dict(args.set) or None)
    print(result.summary())
    if args.json:
        from ...io import atomic_write
        record = dict(model=result.model, path=result.path, format=result.format, dynamic=list(result.dynamic),
                      size_range=list(result.size_range), tolerance=result.tolerance, checks=result.checks,
                      export_s=result.export_s, convert_s=result.convert_s, check_s=result.check_s,
                      file_bytes=result.file_bytes, side_files=result.side_files)
        atomic_write(args.json, lambda tmp: open(tmp, 'w').write(json.dumps(record, indent=2)))
    return 0
