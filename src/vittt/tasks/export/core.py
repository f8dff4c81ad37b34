"""``vittt export``: a registered model (or its ``features_only`` backbone, or a DiT³ / DiT with its ``(x, t, y)``
inputs) to an ONNX file or a ``torch.export`` program (``.pt2``) with a dynamic batch size and resolution, checked
against eager PyTorch before anything is written.

The graph is captured once by ``torch.export`` (the ONNX file is converted from that program by ``torch.onnx``'s
dynamo exporter). The written file is then loaded back (``onnxruntime`` / ``torch.export.load``) and run at several
shapes inside the dynamic range: batch sizes 1 and 3, non-square sides and sides that are not multiples of the
model's stride. The file is written into a temporary folder beside the output and moved into place only when every
shape agrees with eager PyTorch within the tolerance (an ONNX model over 2 GB, e.g. DiT-XL, keeps its weights in
``<name>.data`` beside it); otherwise it is removed and :class:`ExportMismatch` names the worst shape.

Smallest sizes: ``torch.export`` treats a dynamic size that could be 1 as a different program (its 0/1
specialisation: a 1-wide grid changes layouts and broadcasting), so the smallest input side of a dynamic export is
the one whose coarsest grid is 2 tokens wide: twice the model's stride (32 for ViT³ / Vision-TTT, 64 for H-ViT³,
2·patch for DiT³). Smaller inputs are refused by the exported program (a shape guard), not computed wrongly.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['ExportMismatch', 'ExportResult', 'export_model', 'load_export_model', 'check_shapes', 'DYNAMIC_AXES',
           'run_exported']

DYNAMIC_AXES = ('batch', 'height', 'width')
FORMATS = {'.onnx': 'onnx', '.pt2': 'pt2'}


class ExportMismatch(RuntimeError):
    """The exported graph disagrees with eager PyTorch beyond the tolerance (nothing was written)."""


@dataclass
class ExportResult:
    """What :func:`export_model` did: the file, the checks (``[{shape, max_abs_diff, max_abs_ref}]``), times."""

    path: str
    format: str
    model: str
    dynamic: Tuple[str, ...]
    size_range: Tuple[int, int]
    checks: List[Dict[str, Any]] = field(default_factory=list)
    tolerance: float = 0.0
    export_s: float = 0.0
    convert_s: float = 0.0
    check_s: float = 0.0
    file_bytes: int = 0  # the model file and its side files
    side_files: List[str] = field(default_factory=list)  # e.g. an ONNX model's external weights

    @property
    def max_diff(self) -> float:
        return max(c['max_abs_diff'] for c in self.checks)

    def summary(self) -> str:
        lines = [f'{self.model} -> {self.path} ({self.format}, {self.file_bytes / 1e6:.1f} MB), dynamic '
                 f'{", ".join(self.dynamic) or "nothing"}' + (f', sides {self.size_range[0]}..{self.size_range[1]}'
                                                              if 'height' in self.dynamic else '')]
        if self.side_files:
            lines.append(f'  with {", ".join(self.side_files)} beside it (keep them together)')
        for c in self.checks:
            lines.append(f'  {"x".join(map(str, c["shape"])):>16}: max |exported − eager| = {c["max_abs_diff"]:.2e} '
                         f'(outputs up to {c["max_abs_ref"]:.2g})')
        lines.append(f'  max difference {self.max_diff:.2e} ≤ tolerance {self.tolerance:.1e}; export '
                     f'{self.export_s:.0f} s' + (f', ONNX conversion {self.convert_s:.0f} s' if self.format == 'onnx'
                                                 else '') + f', checks {self.check_s:.0f} s')
        return '\n'.join(lines)


@dataclass
class _Target:
    """A model to export with how to call it: ``kind`` 'image' (``x``) or 'dit' (``x, t, y``), its input channels,
    stride (the coarsest grid's reduction) and the side that must divide the input (DiT: the patch; else 1)."""

    model: nn.Module
    kind: str
    in_chans: int
    stride: int
    multiple: int
    default_size: int

    def inputs(self, batch: int, h: int, w: int, seed: int = 0) -> tuple:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, self.in_chans, h, w, generator=g)
        if self.kind == 'image':
            return (x,)
        t = torch.randint(0, 1000, (batch,), generator=g).float()
        y = torch.randint(0, self.model.num_classes, (batch,), generator=g)
        return x, t, y


def _stride(model: nn.Module) -> int:
    info = getattr(model, 'feature_info', None)
    if info is not None and not isinstance(info, list):  # timm FeatureGetterNet / FeatureInfo
        return int(max(info.reduction()))
    if info:
        return int(max(i['reduction'] for i in info))
    patch = getattr(model, 'patch_size', None)
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch or 32)


def load_export_model(name: str, checkpoint=None, features_only: bool = False,
                      model_kwargs: Optional[dict] = None) -> _Target:
    """The model ``name`` in eval mode (randomly initialised, or with ``checkpoint``'s weights: an engine training
    checkpoint, an official ``.pth`` or a converted ``.safetensors``) and how to call it. DiT³ / DiT names
    (``dit3_b_2``, ``DiTTT-B/2``) give a generator with ``(x, t, y)`` inputs (randomly initialised: its zero-initialised
    adaLN and output layers get N(0, 0.02) weights too, so that its output is not identically 0)."""
    import timm
    from ...models.dit3 import DIT_CONFIGS, resolve_dit_name

    kwargs = dict(model_kwargs or {})
    try:
        dit_name = resolve_dit_name(name)
    except ValueError:
        dit_name = None
    if dit_name in DIT_CONFIGS:
        if features_only:
            raise ValueError(f'{name} is a generator: it has no features_only backbone')
        return target_of(_load_dit(dit_name, checkpoint, kwargs))  # traced at 32² latents (256² images) or 28² pixels
    if not timm.is_model(name):
        raise ValueError(f'unknown model {name!r}: not a registered timm / vittt model nor a DiT name '
                         '(dit3_{s,b,l,xl}_{2,4,8}, dit_*)')
    if checkpoint is None:
        return target_of(timm.create_model(name, pretrained=False, features_only=features_only, **kwargs).eval(),
                         name)
    else:
        if kwargs:
            raise ValueError('model options cannot be combined with --checkpoint (the checkpoint defines the model)')
        from ...engine import load_model_weights
        model, in_chans, size = load_model_weights(name, checkpoint)
        if features_only:
            if not hasattr(model, 'forward_intermediates'):
                raise ValueError(f'{name} has no forward_intermediates: no features_only backbone to export')
            from timm.models import FeatureGetterNet
            with torch.device('meta'):  # the registered default taps (e.g. ViT³'s quarter depths)
                taps = timm.create_model(name, pretrained=False, features_only=True).out_indices
            model = FeatureGetterNet(model, out_indices=taps)
    return target_of(model.eval(), name, in_chans, size)


def target_of(model: nn.Module, name: Optional[str] = None, in_chans: Optional[int] = None,
              size: Optional[int] = None) -> _Target:
    """How to call and check an already built model (a DiT³ / DiT, or an image model); an image model's channels
    and traced size default to its (or ``name``'s registered) ``pretrained_cfg``."""
    from ...models.dit3 import DiT3

    if isinstance(model, DiT3):
        size = 32 if model.in_chans == 4 else 28 + -28 % model.patch_size
        return _Target(model, 'dit', model.in_chans, model.patch_size, model.patch_size, size)
    if size is None:
        import timm
        cfg = getattr(model, 'pretrained_cfg', None) or (timm.get_pretrained_cfg(name) if name else None) or {}
        size = int((cfg if isinstance(cfg, dict) else cfg.to_dict()).get('input_size', (3, 224, 224))[-1])
    chans = in_chans if in_chans is not None else getattr(model, 'in_chans', 3) or 3
    return _Target(model, 'image', int(chans), _stride(model), 1, int(size))


def _load_dit(name: str, checkpoint, kwargs: dict) -> nn.Module:
    from ...models.dit3 import create_dit
    from ...models.official import load_checkpoint_file

    if checkpoint is None:
        # DiT's adaLN-zero init makes a fresh model output exactly 0 whatever its input, which would make the check
        # against eager PyTorch vacuous: give the zero-initialised layers small random weights instead
        model = create_dit(name, **kwargs)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        return model.eval()
    from ...engine import is_weight_checkpoint, load_trained_model

    raw = load_checkpoint_file(checkpoint)
    if is_weight_checkpoint(raw):  # a checkpoint of vittt generate train: its recipe builds the model (no VAE needed)
        if kwargs:
            raise ValueError('model options cannot be combined with a training checkpoint (it defines the model)')
        return load_trained_model(raw, task='generation', source=str(checkpoint))[1]
    return create_dit(name, checkpoint=checkpoint, **kwargs).eval()


def _dynamic_shapes(target: _Target, dynamic: Sequence[str], size_range: Tuple[int, int], max_batch: int):
    from torch.export import Dim

    spec: Dict[int, Any] = {}
    if 'batch' in dynamic:
        spec[0] = Dim('batch', min=1, max=max_batch)
    lo, hi = size_range
    m = target.multiple
    for axis, name in ((2, 'height'), (3, 'width')):
        if name in dynamic:
            # DiT: sides are multiples of the patch, declared as such (m · Dim) so the program needs no divisibility
            # guard; the other models pad, any side works
            spec[axis] = Dim(name, min=lo, max=hi) if m == 1 else m * Dim(f'{name}_patches', min=lo // m, max=hi // m)
    shapes = {'x': spec}
    if target.kind == 'dit':
        batch = spec.get(0)
        shapes.update(t={0: batch} if batch is not None else {}, y={0: batch} if batch is not None else {})
    return shapes


def check_shapes(target: _Target, dynamic: Sequence[str], size_range: Tuple[int, int], example: Tuple[int, int]
                 ) -> List[Tuple[int, int, int]]:
    """The ``(batch, height, width)`` inputs the exported file is checked at: the example's, batch 1 at the smallest
    sides, batch 3 at a non-square size whose sides are not multiples of the stride (both inside the range), and a
    larger non-square one."""
    lo, hi = size_range
    m, s = target.multiple, target.stride
    eh, ew = example
    if 'height' not in dynamic:
        return [(1, eh, ew), (3, eh, ew), (2, eh, ew)] if 'batch' in dynamic else [(2, eh, ew)]
    fit = lambda v: max(lo, min(hi, v - v % m))
    odd = lambda v: v + (1 if v % s == 0 and m == 1 else 0)                    # not a multiple of the stride
    shapes = [(2, eh, ew), (1, fit(lo), fit(lo)), (3, fit(odd(lo + s // 2 + 1)), fit(odd(2 * lo + 3 * s // 2 + 3))),
              (2, fit(odd(eh + s + 5)), fit(odd(max(lo, ew // 2 + 7))))]
    if 'batch' not in dynamic:
        shapes = [(2, h, w) for _, h, w in shapes]
    seen, out = set(), []
    for shape in shapes:
        if shape not in seen:
            seen.add(shape)
            out.append(shape)
    return out


def _flatten(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    return [t for v in out for t in _flatten(v)]


def run_exported(path: str, fmt: str, threads: Optional[int] = None) -> Callable[..., List[torch.Tensor]]:
    """A callable running the exported file on tensors (returns the flattened outputs): onnxruntime for ``.onnx``
    (CPU), ``torch.export.load(...).module()`` for ``.pt2``."""
    if fmt == 'onnx':
        import onnxruntime as ort
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # no busy-waiting between calls: spinning pool threads would steal the cores from whatever runs next (the
        # eager variants a benchmark interleaves with this session)
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        names = [i.name for i in session.get_inputs()]

        def run_onnx(*args):
            feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
            return [torch.from_numpy(o) for o in session.run(None, feeds)]
        return run_onnx
    program = torch.export.load(path).module()

    def run_program(*args):
        with torch.no_grad():
            return [t.detach() for t in _flatten(program(*args))]
    return run_program


def export_model(name: str, output, *, checkpoint=None, features_only: bool = False,
                 dynamic: Sequence[str] = DYNAMIC_AXES, min_size: Optional[int] = None,
                 max_size: Optional[int] = None, opset: Optional[int] = None, tolerance: float = 1e-4,
                 example_size: Optional[Tuple[int, int]] = None, max_batch: int = 1024,
                 model_kwargs: Optional[dict] = None, module: Optional[nn.Module] = None,
                 log: Callable[[str], None] = print) -> ExportResult:
    """Export ``name`` to ``output`` (``.onnx`` or ``.pt2``) with the ``dynamic`` axes (a subset of ``batch``,
    ``height``, ``width``; height and width go together), check the written file against eager PyTorch at
    :func:`check_shapes` and keep it only if every output agrees within ``tolerance`` (an absolute difference, scaled
    by ``max(1, max |eager output|)``). Raises :class:`ExportMismatch` otherwise (no file is left behind).
    ``module``: export this already built model (``name`` then only labels it)."""
    output = os.fspath(output)
    fmt = FORMATS.get(os.path.splitext(output)[1].lower())
    if fmt is None:
        raise ValueError(f'the output must end in .onnx or .pt2, got {output!r}')
    dynamic = tuple(dict.fromkeys(dynamic))
    bad = [d for d in dynamic if d not in DYNAMIC_AXES]
    if bad:
        raise ValueError(f'--dynamic takes a comma-separated subset of {",".join(DYNAMIC_AXES)}, got {",".join(bad)}')
    if ('height' in dynamic) != ('width' in dynamic):
        raise ValueError('height and width are dynamic together (give both or neither)')
    if not tolerance > 0:
        raise ValueError(f'the tolerance must be positive, got {tolerance}')
    if fmt == 'onnx':
        for package in ('onnx', 'onnxscript', 'onnxruntime'):
            try:
                __import__(package)
            except ImportError as e:
                raise RuntimeError(f'ONNX export needs {package}: pip install "vittt[onnx]"') from e
    target = load_export_model(name, checkpoint, features_only, model_kwargs) if module is None else \
        target_of(module.eval())
    smallest = 2 * target.stride
    lo = smallest if min_size is None else min_size
    hi = max(4096, lo) if max_size is None else max_size
    if 'height' in dynamic:
        if lo < smallest:
            raise ValueError(f'--min-size {lo} is below {smallest}, the smallest side {name} exports with a dynamic '
                             f'resolution: its coarsest grid (stride {target.stride}) must be at least 2 tokens wide '
                             f'(torch.export specialises sizes that could be 1); export a fixed size for smaller '
                             'inputs (--dynamic batch with --example-size)')
        if hi < lo:
            raise ValueError(f'--max-size {hi} is below --min-size {lo}')
        if target.multiple > 1 and (lo % target.multiple or hi % target.multiple):
            raise ValueError(f'{name} takes sides that are multiples of its patch size {target.multiple}: '
                             f'--min-size / --max-size must be too, got {lo} / {hi}')
    # (a fixed resolution traces the model's own size, however small)
    eh, ew = example_size or ((max(lo, target.default_size) if 'height' in dynamic else target.default_size),) * 2
    if 'height' in dynamic:
        eh, ew = min(max(eh, lo), hi), min(max(ew, lo), hi)
    if target.multiple > 1 and (eh % target.multiple or ew % target.multiple):
        raise ValueError(f'{name} takes sides that are multiples of its patch size {target.multiple}, got {eh}x{ew}')
    example = target.inputs(2, eh, ew)
    shapes = _dynamic_shapes(target, dynamic, (lo, hi), max_batch)
    if target.kind == 'image':
        shapes = (shapes['x'],)
    else:
        shapes = (shapes['x'], shapes['t'], shapes['y'])
    result = ExportResult(output, fmt, name, dynamic, (lo, hi), tolerance=tolerance)

    log(f'exporting {name} ({sum(p.numel() for p in target.model.parameters()) / 1e6:.2f}M params) with '
        f'torch.export, example input {"x".join(map(str, example[0].shape))}, dynamic {", ".join(dynamic) or "-"}')
    start = time.perf_counter()
    program = torch.export.export(target.model, example, dynamic_shapes=shapes)
    result.export_s = time.perf_counter() - start
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    # everything is written into a private folder beside the output under the final file name (an ONNX model over
    # 2 GB keeps its weights in a side file, '<name>.data', which the model refers to by name) and moved into place
    # only after the checks; the model file moves last
    staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.', suffix='.tmp', dir=folder)
    tmp = os.path.join(staging, os.path.basename(output))
    try:
        start = time.perf_counter()
        if fmt == 'onnx':
            log(f'converting to ONNX (torch.onnx dynamo exporter{f", opset {opset}" if opset else ""})')
            kwargs = {} if opset is None else dict(opset_version=opset)
            # optimize=False: onnxscript's graph rewriter takes minutes on these graphs (onnxruntime optimises the
            # graph itself when a session loads it)
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, optimize=False, **kwargs)
            onnx_program.save(tmp)  # weights in '<name>.data' when they exceed protobuf's 2 GB
            del onnx_program
            import onnx
            onnx.checker.check_model(tmp, full_check=True)
        else:
            torch.export.save(program, tmp)
        result.convert_s = time.perf_counter() - start
        start = time.perf_counter()
        run = run_exported(tmp, fmt)
        for i, (b, h, w) in enumerate(check_shapes(target, dynamic, (lo, hi), (eh, ew))):
            args = target.inputs(b, h, w, seed=i + 1)
            with torch.no_grad():
                ref = _flatten(target.model(*args))
            got = run(*args)
            if len(got) != len(ref) or any(g.shape != r.shape for g, r in zip(got, ref)):
                raise ExportMismatch(f'at input {b}x{h}x{w} the exported graph returns shapes '
                                     f'{[tuple(g.shape) for g in got]}, eager PyTorch {[tuple(r.shape) for r in ref]}')
            diff = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
            scale = max(r.abs().max().item() for r in ref)
            check = dict(shape=[b, target.in_chans, h, w], max_abs_diff=diff, max_abs_ref=scale)
            result.checks.append(check)
            log(f'  checked {b}x{target.in_chans}x{h}x{w}: max |exported − eager| = {diff:.2e}')
            if not math.isfinite(diff) or diff > tolerance * max(1.0, scale):
                raise ExportMismatch(
                    f'the exported graph disagrees with eager PyTorch at input {b}x{target.in_chans}x{h}x{w}: max '
                    f'|difference| {diff:.3g} > tolerance {tolerance:g} × max(1, {scale:.3g}); nothing was written '
                    f'to {output}')
        del run
        result.check_s = time.perf_counter() - start
        sides = sorted(f for f in os.listdir(staging) if f != os.path.basename(output))
        for f in sides:
            os.replace(os.path.join(staging, f), os.path.join(folder, f))
        os.replace(tmp, output)
        result.file_bytes = os.path.getsize(output) + sum(os.path.getsize(os.path.join(folder, f)) for f in sides)
        result.side_files = [os.path.join(folder, f) for f in sides]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
